"""Run one fleet command on this supervisor: the same restart ``ag1-fleet restart`` does.

A command is done when the agent is READY again (every desired worker ready,
within the agent's ``start_timeout`` after the restart returned); a roll that
fails, an unknown or stopped agent, or an agent that does not get ready raise
:class:`~supervisor.fleet.snapshot.ControlError` with the reason the ack carries.
"""

from __future__ import annotations

import anyio

from supervisor.fleet.controller import FleetController
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.commands import OP_RESTART, Command
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.table import AgentRuntime, WorkerTable


async def execute_command(
    control: FleetController, table: WorkerTable, runner: WorkerRunner, command: Command
) -> str:
    """Run ``command`` here; returns ``"ready/desired"`` once the agent is READY again."""
    if command.op != OP_RESTART:
        raise ControlError(f"unknown fleet command op {command.op!r}")
    await control.restart_agent(command.agent, rolling=command.rolling)
    runtime = table.get(command.agent)
    if runtime is None:  # removed by a reload while it restarted
        raise ControlError(f"agent {command.agent!r} is gone")
    if not await wait_agent_ready(runner, runtime, float(runtime.config.start_timeout)):
        raise ControlError(
            f"agent {command.agent} not ready within {runtime.config.start_timeout:g}s "
            f"after the restart ({ready_text(runtime)})"
        )
    return ready_text(runtime)


def ready_text(runtime: AgentRuntime) -> str:
    return f"{len(runtime.ready_workers())}/{runtime.desired}"


async def wait_agent_ready(runner: WorkerRunner, runtime: AgentRuntime, deadline: float) -> bool:
    """True once every desired worker of ``runtime`` is READY (woken by worker changes)."""
    with anyio.move_on_after(deadline):
        while len(runtime.ready_workers()) < runtime.desired:
            await runner.wait_changed()
        return True
    return False
