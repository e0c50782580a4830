"""``memory_limit`` is enforced close to the limit (issue 13), end to end.

Real supervisor (full resource sample every 5 s, the default), real worker
process, real redis-server: a handler that leaks 40 MiB per message (touched,
so it is resident) gets messages at a steady pace, or a burst that waits in the
worker's read-ahead while one handler holds its 40 MiB. The test samples the
worker's process tree itself with psutil every 20 ms: the worker must be
restarted for memory after the message that crossed the limit, with nothing
handled after it (nor during the drain), and its RSS must never get 10 % above
the limit. With only the 5 s sample, several more messages (40 MiB each) land
before the supervisor looks (275 MiB in both cases).

One message's allocation cannot be stopped from outside the process (only a
cgroup ``memory.max`` could, by OOM-killing): the handler therefore pads the
worker to a fixed 75 MiB first, so the crossing message ends ~3 % over the limit
whatever the interpreter's own size, and a second one would end 30 % over.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from core_bus import Envelope, publish_many
from tests.fleet_harness import agent, agent_toml, fleet_toml, running, worker
from tests.waiting import eventually

pytestmark = [pytest.mark.slow]

MiB = 2**20
LIMIT = 150 * MiB
#: The first message tops the worker up to START, so the crossing lands at a known
#: place whatever the interpreter's own RSS: 115 MiB after it, ~155 MiB (3 % over)
#: after the second, ~195 MiB (30 % over) if a third got through.
START = 75 * MiB
LEAK = 40 * MiB
LEAK_HANDLER = f"""
import asyncio
import os

LEAK = []
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def handle(env, redis):
    if not LEAK:
        LEAK.append(bytearray(b"\\x01") * max(0, {START} - rss()))
    LEAK.append(bytearray(b"\\x01") * {LEAK})  # every page written: resident
    await asyncio.sleep(float(env.content))  # the burst case: entries queue up meanwhile
    await redis.incr(f"leak:handled:{{os.getpid()}}")
"""
INBOX = "AG1:agent:leak:inbox"
#: steady: one message a second (40 MiB/s of growth), handled at once
PACE = 1.0
#: burst: this many published at once to a worker running one handler at a time that
#: holds each for HOLD seconds, so the rest wait in its read-ahead when SIGTERM comes
BURST = 8
HOLD = 1.0


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` and its descendants now (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class PeakWatcher:
    """Polls one process tree's RSS every 20 ms (in a thread) and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.readings = 0

    async def run(self) -> None:
        while True:
            rss = await anyio.to_thread.run_sync(tree_rss, self.pid)
            self.peak = max(self.peak, rss)
            self.readings += 1
            if rss == 0 and self.readings > 1:
                return  # the worker exited
            await anyio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pace", ["steady", "burst"])
async def test_leaking_worker_is_stopped_within_ten_percent_of_its_limit(
    tmp_path: Path, redis: Any, redis_url: str, pace: str
) -> None:
    """steady: the guard is faster than the messages; burst: the drain after SIGTERM
    finishes the running handler and takes nothing from the read-ahead."""
    (tmp_path / "leak_agent.py").write_text(LEAK_HANDLER)
    toml = fleet_toml(
        agent_toml(
            "leak",
            handler="leak_agent:handle",
            memory_limit="150MiB",
            stop_timeout="10s",
            start_seconds="30s",
            concurrency=1 if pace == "burst" else 16,
        ),
        url=redis_url,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "leak").state == "ready", timeout=30)
        pid = worker(daemon, "leak").pid
        assert pid is not None
        watcher = PeakWatcher(pid)
        baseline = await anyio.to_thread.run_sync(tree_rss, pid)
        assert baseline < START, "the worker alone is bigger than the test's starting point"
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.run)

            async def publish_steadily() -> None:
                while True:
                    await publish_many(redis, INBOX, [Envelope(role="user", content="0")])
                    await anyio.sleep(PACE)

            if pace == "burst":
                envs = [Envelope(role="user", content=str(HOLD)) for _ in range(BURST)]
                await publish_many(redis, INBOX, envs)
            else:
                tg.start_soon(publish_steadily)
            await eventually(
                lambda: worker(daemon, "leak").last_exit == "memory limit",
                timeout=60,
                interval=0.05,
                message="restarted for memory",
            )
            tg.cancel_scope.cancel()
        assert agent(daemon, "leak").exits_by_reason["memory limit"] >= 1
        handled = int(await redis.get(f"leak:handled:{pid}") or 0)
    print(
        f"baseline {baseline / MiB:.0f} MiB, peak {watcher.peak / MiB:.0f} MiB "
        f"(limit {LIMIT / MiB:.0f} MiB, {watcher.readings} readings), {handled} handled ({pace})"
    )
    assert watcher.readings > 10
    assert watcher.peak > LIMIT, "the leak never reached the limit: the test measures nothing"
    # The message that crossed the limit is the last one handled (the drain takes no more).
    assert handled == 2, f"{handled} messages handled, only 2 were needed to cross the limit"
    assert watcher.peak < LIMIT * 1.10, (
        f"peak RSS {watcher.peak / MiB:.0f} MiB is {watcher.peak / LIMIT - 1:.0%} over the limit"
    )


@pytest.mark.timeout(30)
def test_resident_bytes_reads_what_psutil_reads(python_exe: str) -> None:
    """The guard's statm reading is psutil's rss; the sampler remembers each tree's members,
    and a reading of processes that are all gone is None (not 0: no evidence)."""
    import subprocess

    from supervisor.runtime.resources import ResourceSampler, resident_bytes

    code = "import time; print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen([python_exe, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"  # started and idle: its RSS holds still
        me = psutil.Process()
        sampler = ResourceSampler()
        usage = sampler.sample([me.pid])
        assert set(sampler.members(me.pid)) >= {me.pid, child.pid}
        assert sampler.members(424242) == (424242,)  # unknown root: just itself
        reading = resident_bytes(sampler.members(me.pid))
        assert reading is not None
        assert abs(reading - usage[me.pid].rss_bytes) < 16 * MiB
        assert resident_bytes([child.pid]) == psutil.Process(child.pid).memory_info().rss
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert resident_bytes([child.pid]) is None
