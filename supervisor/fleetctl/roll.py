"""Roll an agent across the fleet, host by host: the coordinator side of the command stream.

For each live member that runs the agent, in name order: XADD a restart
command addressed to it, then wait (blocking XREAD on the acks stream, from
the newest ack id taken *before* the command was written) for its ack. The
next host gets its command only after the previous one acknowledged with the
agent READY again. A failed ack, or none within the per-host deadline, stops
the roll: the hosts after it are not touched and
:class:`~supervisor.fleet.snapshot.ControlError` names the host and why. A
member that left the fleet before its turn is skipped. Progress is kept in a
:class:`FleetRoll` that ``GET /v1/fleet`` shows while it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.clock import redis_time_ms as redis_ms
from core_bus.streams.errors import is_transient
from core_bus.streams.replies import streams_of
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.commands import (
    OP_RESTART,
    Ack,
    Command,
    ack_of,
    issue,
    last_entry_id,
    new_command_id,
)
from supervisor.membership.directory import MemberInfo, live_members

log = get_logger("supervisor.fleetctl")

Members = Callable[[], Awaitable[list[MemberInfo]]]


@dataclass
class HostStep:
    """One host's part of a fleet roll."""

    name: str
    state: str = "waiting"  # waiting | running | ok | failed | skipped
    cmd: str = ""
    error: str = ""
    ready: str = ""
    issued_ms: int = 0  # Redis time the command was written
    started_ms: int = 0  # Redis time the host began
    acked_ms: int = 0  # Redis time of its ack


@dataclass
class FleetRoll:
    """A fleet-wide restart of one agent and where it stands."""

    id: str
    agent: str
    rolling: bool
    issued_by: str
    state: str = "running"  # running | done | failed
    error: str = ""
    hosts: list[HostStep] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent": self.agent,
            "rolling": self.rolling,
            "issued_by": self.issued_by,
            "state": self.state,
            "error": self.error,
            "hosts": [vars(h).copy() for h in self.hosts],
        }


def targets(members: list[MemberInfo], agent: str) -> list[str]:
    """The live members that run ``agent``, in name order."""
    return sorted(m.name for m in members if m.alive and agent in m.agents)


async def roll_fleet(
    redis: Any,
    keys: StreamKeyBuilder,
    roll: FleetRoll,
    *,
    host_timeout: float,
    members: Members | None = None,
) -> FleetRoll:
    """Run ``roll`` host by host (see the module docstring); raises ControlError on failure."""
    current: Members = members or (lambda: live_members(redis, keys))
    names = targets(await current(), roll.agent)
    if not names:
        roll.state, roll.error = "failed", f"no live supervisor runs agent {roll.agent!r}"
        raise ControlError(roll.error)
    roll.hosts = [HostStep(name) for name in names]
    log.info("fleet roll started", agent=roll.agent, roll=roll.id, hosts=names)
    for step in roll.hosts:
        if step.name not in targets(await current(), roll.agent):
            step.state, step.error = "skipped", "left the fleet before its turn"
            log.warning("fleet roll: host skipped", agent=roll.agent, host=step.name)
            continue
        await _run_step(redis, keys, roll, step, host_timeout)
        if step.state != "ok":
            done = [h.name for h in roll.hosts if h.state == "ok"]
            untouched = [h.name for h in roll.hosts if h.state == "waiting"]
            roll.state = "failed"
            roll.error = (
                f"fleet restart of {roll.agent} stopped at {step.name}: {step.error} "
                f"(done: {', '.join(done) or 'none'}; "
                f"not started: {', '.join(untouched) or 'none'})"
            )
            log.error("fleet roll failed", agent=roll.agent, roll=roll.id, error=roll.error)
            raise ControlError(roll.error)
    roll.state = "done"
    log.info("fleet roll done", agent=roll.agent, roll=roll.id, hosts=names)
    return roll


async def _run_step(
    redis: Any, keys: StreamKeyBuilder, roll: FleetRoll, step: HostStep, seconds: float
) -> None:
    acks_from = await last_entry_id(redis, keys.fleet_command_acks())
    now_ms = await redis_ms(redis)
    command = Command(
        id=new_command_id(),
        target=step.name,
        op=OP_RESTART,
        agent=roll.agent,
        rolling=roll.rolling,
        issued_by=roll.issued_by,
        deadline_ms=now_ms + int(seconds * 1000),
    )
    step.cmd, step.state, step.issued_ms = command.id, "running", now_ms
    await issue(redis, keys, command)
    ack = await wait_ack(redis, keys, command.id, acks_from, seconds)
    if ack is None:
        step.state = "failed"
        step.error = f"no acknowledgement within {seconds:g}s"
        return
    step.state = "ok" if ack.ok else "failed"
    step.error, step.ready = ack.error, ack.ready
    step.started_ms, step.acked_ms = ack.started_ms, ack.acked_ms


async def wait_ack(
    redis: Any, keys: StreamKeyBuilder, cmd: str, after: str, seconds: float
) -> Ack | None:
    """The ack of command ``cmd`` written after entry ``after``; None past ``seconds``.

    Blocking XREAD; a lost Redis is retried with backoff from the last id read.
    """
    stream = keys.fleet_command_acks()
    position = after
    attempt = 0
    with anyio.move_on_after(seconds):
        while True:
            try:
                reply = await redis.xread(
                    {stream: position}, count=100, block=blocking_ms(redis, seconds)
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                attempt += 1
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
                continue
            attempt = 0
            for _stream, entries in streams_of(reply):
                for entry_id, raw in entries:
                    position = entry_id
                    ack = ack_of(entry_id, raw)
                    if ack is not None and ack.cmd == cmd:
                        return ack
    return None
