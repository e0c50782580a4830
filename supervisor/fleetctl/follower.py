"""Every supervisor follows the fleet's command stream and runs what is addressed to it.

One blocking XREAD (``BLOCK`` below the client's socket timeout) from the
stream's newest id at start: commands issued before this supervisor started
are history, not work. The read position is kept across Redis losses, so a
follower that reconnects (backoff 50 ms doubling to 5 s, logged once per
state change) runs what arrived meanwhile, unless its ``deadline_ms`` (Redis
time) has passed: then it answers ``ok=0, expired`` instead of restarting
late. Commands run one at a time, in stream order; each is acknowledged on
the acks stream once it is done (for a restart: the agent is READY again),
and the ack is retried until Redis takes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.clock import redis_time_ms as redis_ms
from core_bus.streams.errors import is_transient
from core_bus.streams.repeats import ErrorStreak
from core_bus.streams.replies import streams_of
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.commands import (
    Ack,
    Command,
    acknowledge,
    command_of,
    last_entry_id,
)

log = get_logger("supervisor.fleetctl")

#: Runs one command locally; returns the ``ready`` text ("2/2"); raises ControlError.
Executor = Callable[[Command], Awaitable[str]]
#: How long one blocking read may wait (capped below the socket timeout).
BLOCK_SECONDS = 30.0


class CommandFollower:
    """Follows ``keys.fleet_commands()`` for the commands whose ``target`` is ``name``."""

    def __init__(self, redis: Any, keys: StreamKeyBuilder, name: str, execute: Executor) -> None:
        self._redis = redis
        self._keys = keys
        self.name = name
        self._execute = execute
        self.position: str | None = None  # id of the last entry read
        self.handled = 0
        self._lost = False
        self.started = anyio.Event()  # set once the start position is known

    async def run(self) -> None:
        """Follow until cancelled."""
        stream = self._keys.fleet_commands()
        attempt = 0
        unexpected = ErrorStreak(log, "fleet_commands_read_failed")
        while True:
            try:
                if self.position is None:
                    self.position = await last_entry_id(self._redis, stream)
                    self.started.set()
                reply = await self._redis.xread(
                    {stream: self.position},
                    count=10,
                    block=blocking_ms(self._redis, BLOCK_SECONDS),
                )
            except Exception as exc:  # never let a Redis reply take the daemon down
                attempt += 1
                if is_transient(exc):
                    self._connection_lost(exc)
                else:
                    unexpected.failed(exc)  # logged once per distinct error
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
                continue
            attempt = 0
            unexpected.succeeded()
            self._connection_restored()
            for _stream, entries in streams_of(reply):
                for entry_id, raw in entries:
                    self.position = entry_id
                    command = command_of(entry_id, raw)
                    if command is not None and command.target == self.name:
                        await self.handle(command)

    async def handle(self, command: Command) -> Ack:
        """Run one command addressed to us and acknowledge it (a plain method tests call)."""
        bound = log.bind(
            cmd=command.id, op=command.op, agent=command.agent, issued_by=command.issued_by
        )
        started = await self._redis_ms_or_zero()
        if command.deadline_ms and started > command.deadline_ms:
            ack = Ack(command.id, self.name, False, "expired before it could run", "", started)
            bound.warning("fleet command expired")
        else:
            bound.info("fleet command started", rolling=command.rolling)
            try:
                ready = await self._execute(command)
                ack = Ack(command.id, self.name, True, "", ready, started)
                bound.info("fleet command done", ready=ready)
            except ControlError as exc:  # UnknownAgentError included
                ack = Ack(command.id, self.name, False, _message(exc), "", started)
                bound.error("fleet command failed", error=ack.error)
        await self._ack(ack)
        self.handled += 1
        return ack

    async def _ack(self, ack: Ack) -> None:
        """Write the ack; a lost Redis is retried for a while (about 3 minutes)."""
        for attempt in range(1, 40):
            try:
                await acknowledge(self._redis, self._keys, ack)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._connection_lost(exc)
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
        log.error("fleet command ack lost", cmd=ack.cmd, ok=ack.ok)

    async def _redis_ms_or_zero(self) -> int:
        try:
            return await redis_ms(self._redis)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return 0  # unknown: run it (the deadline is a guard, not a requirement)

    def _connection_lost(self, exc: BaseException) -> None:
        if not self._lost:
            self._lost = True
            log.warning(
                "fleet commands: redis unavailable",
                supervisor=self.name,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _connection_restored(self) -> None:
        if self._lost:
            self._lost = False
            log.info("fleet commands: redis back", supervisor=self.name, position=self.position)


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return text or type(exc).__name__
