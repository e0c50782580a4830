"""RSS and CPU% of each worker's process tree, sampled periodically (psutil).

One sample walks the machine's process table once (parent links) and reads
each tree member's memory and CPU times; the daemon runs it in a worker
thread every few seconds, never per event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Usage:
    rss_bytes: int
    cpu_percent: float


class ResourceSampler:
    """Keeps psutil.Process objects across samples so cpu_percent has a baseline."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

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
            return {}
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            ppid = proc.info.get("ppid")
            if ppid:
                children.setdefault(ppid, []).append(proc.pid)
        seen: set[int] = set()
        result: dict[int, Usage] = {}
        for root in roots:
            tree = [root]
            i = 0
            while i < len(tree):
                tree.extend(children.get(tree[i], ()))
                i += 1
            rss = 0
            cpu = 0.0
            alive = False
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
            if alive:
                result[root] = Usage(rss, cpu)
        for pid in list(self._procs):
            if pid not in seen:
                del self._procs[pid]
        return result
