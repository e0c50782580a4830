"""Rolling restart of one agent: replacements first, then drain the old workers.

Per batch of ``max_surge`` workers (or, with ``max_surge = 0``, of
``max_unavailable`` workers stopped first): start replacements, wait for their
READY within the agent's ``start_timeout``, then stop (drain) the old ones.
A replacement that exits or is not ready in time stops the roll: the
replacements are dropped, the old workers keep running (or are started again),
the reason is kept in ``AgentRuntime.last_roll_error`` (shown in ``/status``)
and :class:`~supervisor.fleet.snapshot.ControlError` is raised.

The algorithm only sequences: the table records (retired, rolling, errors),
the runner spawns, stops and reports changes.
"""

from __future__ import annotations

import anyio

from core_bus.log import get_logger
from supervisor.fleet.snapshot import ControlError
from supervisor.runtime.lifecycle import CAUSE_STOP, WorkerState
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.table import AgentRuntime, Worker, WorkerTable

log = get_logger("supervisor.fleet.rollout")


async def roll_agent(table: WorkerTable, runner: WorkerRunner, runtime: AgentRuntime) -> None:
    """Replace every active worker of ``runtime``; one roll per agent at a time."""
    if runtime.rolling:
        raise ControlError(f"agent {runtime.name!r}: a rolling restart is already running")
    if runner.stopping:
        raise ControlError("the supervisor is stopping")
    table.begin_roll(runtime)  # the reconcile loop does not scale a rolling agent
    try:
        await _roll_workers(_Roll(table, runner), runtime)
    finally:
        table.end_roll(runtime)
        runner.poke()


class _Roll:
    """The table and the runner a roll works with."""

    def __init__(self, table: WorkerTable, runner: WorkerRunner) -> None:
        self.table = table
        self.runner = runner


async def _roll_workers(ops: _Roll, runtime: AgentRuntime) -> None:
    agent = runtime.config
    old = sorted(runtime.active(), key=lambda w: w.slot)
    surge = max(int(agent.max_surge), 0)
    batch = surge if surge > 0 else max(int(agent.max_unavailable), 1)
    log.info("rolling restart", agent=runtime.name, workers=len(old), batch=batch)
    for i in range(0, len(old), batch):
        if ops.runner.stopping:
            raise ControlError("rolling restart interrupted: the supervisor is stopping")
        await _roll_batch(ops, runtime, old[i : i + batch], surge_first=surge > 0)
    _compact_slots(ops, runtime)
    log.info("rolling restart done", agent=runtime.name)


def _compact_slots(ops: _Roll, runtime: AgentRuntime) -> None:
    """Surge replacements had to take slots past the old ones (``echo/2`` while
    ``echo/0`` and ``echo/1`` ran); once the old workers are gone, move them down
    into the freed slots so the agent reads ``echo/0 .. echo/N-1`` again."""
    active = sorted(runtime.active(), key=lambda w: w.slot)
    wanted = len(active)
    free = [s for s in range(wanted) if s not in runtime.workers]
    for worker in [w for w in active if w.slot >= wanted]:
        if not free:
            break
        ops.runner.renumber(runtime, worker, free.pop(0))


async def _retire_all(ops: _Roll, workers: list[Worker]) -> None:
    async with anyio.create_task_group() as tg:
        for worker in workers:
            ops.table.retire(worker)
            tg.start_soon(ops.runner.stop_and_wait, worker, CAUSE_STOP)


async def _roll_batch(
    ops: _Roll, runtime: AgentRuntime, group: list[Worker], *, surge_first: bool
) -> None:
    """Replace ``group``: replacements first (surge) or, without surge, old ones first."""
    if not surge_first:
        await _retire_all(ops, group)
    now = ops.runner.now()
    fresh: list[Worker] = []
    for slot in ops.table.free_slots(runtime, len(group)):
        worker = ops.table.add_worker(runtime, slot, now)
        fresh.append(worker)
        ops.runner.spawn(runtime, worker, now)
    if not await wait_ready(ops.runner, fresh, float(runtime.config.start_timeout)):
        _abort(ops, runtime, group, fresh)
    if surge_first:
        await _retire_all(ops, group)
    for worker in group:
        if not worker.lifecycle.running:
            ops.table.drop_worker(runtime, worker)


def _abort(ops: _Roll, runtime: AgentRuntime, old: list[Worker], fresh: list[Worker]) -> None:
    """Drop the replacements, keep (or bring back) the old workers, report; raises."""
    exits = [f"{w.key}: {w.lifecycle.last_exit.reason}" for w in fresh if w.lifecycle.last_exit]
    for worker in fresh:
        ops.table.retire(worker)
        ops.runner.stop(worker, CAUSE_STOP)
    now = ops.runner.now()
    for worker in old:
        ops.table.retire(worker, False)
        if not worker.lifecycle.running:
            ops.table.request_start(worker, now)
    error = (
        f"rolling restart of {runtime.name} stopped: a replacement did not become "
        f"ready within {runtime.config.start_timeout:g}s"
        + (f" ({'; '.join(exits)})" if exits else "")
    )
    ops.table.roll_failed(runtime, error)
    log.error("rolling restart failed", agent=runtime.name, error=error)
    raise ControlError(error)


async def wait_ready(runner: WorkerRunner, workers: list[Worker], deadline: float) -> bool:
    """True once every worker is READY; False on a failed start or after ``deadline`` s."""
    with anyio.move_on_after(deadline):
        while True:
            states = [w.lifecycle.state for w in workers]
            if all(s == WorkerState.READY for s in states):
                return True
            if any(w.lifecycle.last_exit is not None for w in workers):
                return False
            await runner.wait_changed()
    return False
