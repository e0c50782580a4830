"""Rolling restart of one agent: replacements first, then drain the old workers.

Per batch of ``max_surge`` workers (or, with ``max_surge = 0``, of
``max_unavailable`` workers stopped first): start replacements, wait for their
READY within the agent's ``start_timeout``, then stop (drain) the old ones.
A replacement that exits or is not ready in time stops the roll: the
replacements are dropped, the old workers keep running (or are started again),
the reason is kept in ``AgentRuntime.last_roll_error`` (shown in ``/status``)
and :class:`~supervisor.fleet.snapshot.ControlError` is raised.

The algorithm only sequences; spawning, stopping and change notification are
the daemon's (:class:`WorkerOps`).
"""

from __future__ import annotations

from typing import Protocol

import anyio

from core_bus.log import get_logger
from supervisor.fleet.snapshot import ControlError
from supervisor.runtime.lifecycle import CAUSE_STOP, WorkerState
from supervisor.runtime.table import AgentRuntime, Worker

log = get_logger("supervisor.fleet.rollout")


class WorkerOps(Protocol):
    """What a roll needs of the daemon."""

    @property
    def stopping(self) -> bool: ...

    def now(self) -> float: ...

    def poke(self) -> None: ...

    def add_worker(self, runtime: AgentRuntime, slot: int, now: float) -> Worker: ...

    def spawn_worker(self, runtime: AgentRuntime, worker: Worker, now: float) -> None: ...

    def stop_worker(self, worker: Worker, cause: str, kill: bool = False) -> None: ...

    async def stop_and_wait(self, worker: Worker, cause: str) -> None: ...

    async def wait_changed(self) -> None: ...


async def roll_agent(ops: WorkerOps, runtime: AgentRuntime) -> None:
    """Replace every active worker of ``runtime``; one roll per agent at a time."""
    if runtime.rolling:
        raise ControlError(f"agent {runtime.name!r}: a rolling restart is already running")
    if ops.stopping:
        raise ControlError("the supervisor is stopping")
    runtime.rolling = True  # the reconcile loop does not scale a rolling agent
    runtime.last_roll_error = None
    try:
        await _roll_workers(ops, runtime)
    finally:
        runtime.rolling = False
        ops.poke()


async def _roll_workers(ops: WorkerOps, runtime: AgentRuntime) -> None:
    agent = runtime.config
    old = sorted(runtime.active(), key=lambda w: w.slot)
    surge = max(int(agent.max_surge), 0)
    batch = surge if surge > 0 else max(int(agent.max_unavailable), 1)
    log.info("rolling restart", agent=runtime.name, workers=len(old), batch=batch)
    for i in range(0, len(old), batch):
        if ops.stopping:
            raise ControlError("rolling restart interrupted: the supervisor is stopping")
        await _roll_batch(ops, runtime, old[i : i + batch], surge_first=surge > 0)
    log.info("rolling restart done", agent=runtime.name)


async def _retire_all(ops: WorkerOps, workers: list[Worker]) -> None:
    async with anyio.create_task_group() as tg:
        for worker in workers:
            worker.retired = True
            tg.start_soon(ops.stop_and_wait, worker, CAUSE_STOP)


async def _roll_batch(
    ops: WorkerOps, runtime: AgentRuntime, group: list[Worker], *, surge_first: bool
) -> None:
    """Replace ``group``: replacements first (surge) or, without surge, old ones first."""
    if not surge_first:
        await _retire_all(ops, group)
    now = ops.now()
    used = set(runtime.workers)
    fresh: list[Worker] = []
    slot = 0
    for _ in group:
        while slot in used:
            slot += 1
        used.add(slot)
        worker = ops.add_worker(runtime, slot, now)
        fresh.append(worker)
        ops.spawn_worker(runtime, worker, now)
    if not await wait_ready(ops, fresh, float(runtime.config.start_timeout)):
        _abort(ops, runtime, group, fresh)
    if surge_first:
        await _retire_all(ops, group)
    for worker in group:
        if not worker.lifecycle.running:
            runtime.workers.pop(worker.slot, None)


def _abort(ops: WorkerOps, runtime: AgentRuntime, old: list[Worker], fresh: list[Worker]) -> None:
    """Drop the replacements, keep (or bring back) the old workers, report; raises."""
    exits = [f"{w.key}: {w.lifecycle.last_exit.reason}" for w in fresh if w.lifecycle.last_exit]
    for worker in fresh:
        worker.retired = True
        ops.stop_worker(worker, CAUSE_STOP)
    now = ops.now()
    for worker in old:
        worker.retired = False
        if not worker.lifecycle.running:
            worker.lifecycle.request_start(now)
    runtime.last_roll_error = (
        f"rolling restart of {runtime.name} stopped: a replacement did not become "
        f"ready within {runtime.config.start_timeout:g}s"
        + (f" ({'; '.join(exits)})" if exits else "")
    )
    log.error("rolling restart failed", agent=runtime.name, error=runtime.last_roll_error)
    raise ControlError(runtime.last_roll_error)


async def wait_ready(ops: WorkerOps, workers: list[Worker], deadline: float) -> bool:
    """True once every worker is READY; False on a failed start or after ``deadline`` s."""
    with anyio.move_on_after(deadline):
        while True:
            states = [w.lifecycle.state for w in workers]
            if all(s == WorkerState.READY for s in states):
                return True
            if any(w.lifecycle.last_exit is not None for w in workers):
                return False
            await ops.wait_changed()
    return False
