"""RSS and CPU% of each worker's process tree, sampled periodically (psutil);
a cheap RSS reading of the trees it found (``/proc/<pid>/statm``); OOM evidence
from the cgroup's ``memory.events``.

One sample walks the machine's process table once (parent links) and reads
each tree member's memory and CPU times; the daemon runs it in a worker
thread every few seconds, never per event. Between samples the memory guard
re-reads only the resident size of the members each sample found (one tiny
file per process, the same number psutil reports as ``rss``), several times a
second, so a leaking worker is stopped close to its ``memory_limit``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Usage:
    rss_bytes: int
    cpu_percent: float


class ResourceSampler:
    """Keeps psutil.Process objects across samples so cpu_percent has a baseline."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        #: root pid -> the live members of its tree at the last sample (root first)
        self.trees: dict[int, tuple[int, ...]] = {}

    def _proc(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
                proc.cpu_percent(None)  # baseline
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def sample(self, roots: Iterable[int]) -> dict[int, Usage]:
        """Usage of the tree under each root pid (root included); missing roots omitted."""
        roots = list(roots)
        if not roots:
            self._procs.clear()
            self.trees = {}
            return {}
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            ppid = proc.info.get("ppid")
            if ppid:
                children.setdefault(ppid, []).append(proc.pid)
        seen: set[int] = set()
        result: dict[int, Usage] = {}
        trees: dict[int, tuple[int, ...]] = {}
        for root in roots:
            tree = [root]
            i = 0
            while i < len(tree):
                tree.extend(children.get(tree[i], ()))
                i += 1
            rss = 0
            cpu = 0.0
            alive = False
            members: list[int] = []
            for pid in tree:
                found = self._proc(pid)
                if found is None:
                    continue
                proc = found
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
                    cpu += proc.cpu_percent(None)
                    alive = True
                    seen.add(pid)
                    members.append(pid)
            if alive:
                result[root] = Usage(rss, cpu)
                trees[root] = tuple(members)
        for pid in list(self._procs):
            if pid not in seen:
                del self._procs[pid]
        self.trees = trees
        return result

    def members(self, root: int) -> tuple[int, ...]:
        """The tree under ``root`` as the last sample found it (just the root before one)."""
        return self.trees.get(root) or (root,)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pids: Sequence[int]) -> int | None:
    """Summed resident size of ``pids`` from ``/proc/<pid>/statm`` (a few µs each);
    members that exited count 0, None when none is left (or there is no /proc)."""
    total = 0
    found = False
    for pid in pids:
        try:  # os.open/os.read: half the cost of open(), this runs several times a second
            fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
            try:
                fields = os.read(fd, 256).split()
            finally:
                os.close(fd)
        except OSError:
            continue
        with contextlib.suppress(IndexError, ValueError):
            total += int(fields[1]) * _PAGE_SIZE
            found = True
    return total if found else None


class OomEvidence:
    """Did the kernel OOM-kill something in our cgroup? (cgroup v2 ``memory.events``).

    The ``oom_kill`` counter (hierarchical: our workers live in the
    supervisor's cgroup unless something moved them) is read at start and at
    each unexplained SIGKILL; only a rise is evidence. Where the file is not
    readable (cgroup v1, containers without it) there is no evidence.
    """

    def __init__(self, events_path: Path | None = None) -> None:
        self.path = events_path if events_path is not None else _own_memory_events()
        self._last = self._read()

    def _read(self) -> int | None:
        if self.path is None:
            return None
        try:
            text = self.path.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                with contextlib.suppress(ValueError):
                    return int(value)
        return None

    def rose(self) -> bool:
        """True when ``oom_kill`` grew since the last look."""
        now = self._read()
        if now is None:
            return False
        before, self._last = self._last, now
        return before is not None and now > before


def _own_memory_events() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            path = Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.events"
            return path if path.exists() else None
    return None
