"""``subscribe_simple``: the prototype's group-less follower of one stream.

No consumer group, nothing acked or retried: every process that follows sees
every entry published after it started (``start_id="$"``), like ``tail -f``.
It runs until cancelled, or until SIGINT/SIGTERM when nobody else handles
them (then it returns; see :mod:`core_bus.foreground`). It waits in a
blocking XREAD of up to ``poll_delay`` seconds (never a busy loop); a lost
connection is logged once, retried with backoff, and reading resumes after
the last entry seen. A malformed entry or a failing callback is logged and
skipped: with no group there is nowhere to retry it from.
"""

from __future__ import annotations

from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.decode import Malformed, decode_payload, payload_of
from core_bus.consume.handlers import Handler, handler_arity
from core_bus.foreground import run_until_signal
from core_bus.log import get_logger
from core_bus.settings import get_settings
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.replies import streams_of, text
from core_bus.streams.slots import xread as slot_xread

READ_COUNT = 100


async def subscribe_simple(
    redis: AsyncRedis,
    stream: str,
    callback: Handler,
    poll_delay: float = 1,
    start_id: str = "$",
) -> None:
    """Call ``callback(env)`` (or ``callback(env, redis)``) for each new entry of ``stream``.

    ``start_id`` is where to start: ``"$"`` (entries added from now on), ``"0"``
    (the whole stream) or an entry id (entries after it).

    :raises TypeError: ``callback`` is not ``async def cb(env)`` / ``cb(env, redis)``.
    """
    arity = handler_arity(callback)
    if poll_delay <= 0:
        raise ValueError("poll_delay must be > 0")
    follower = _Follower(redis, text(stream), callback, arity, poll_delay, start_id)
    await run_until_signal(follower.run)


class _Follower:
    def __init__(
        self,
        redis: AsyncRedis,
        stream: str,
        callback: Handler,
        arity: int,
        poll_delay: float,
        start_id: str,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.callback = callback
        self.arity = arity
        self.block_ms = blocking_ms(redis, poll_delay)
        self.position = start_id
        self.limit = get_settings().bus_max_envelope_bytes
        self.log = get_logger("core_bus.follower", stream=stream)

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                if self.position == "$":
                    # Pin "$" to an id once: a reconnect must not skip what came meanwhile.
                    newest = await self.redis.xrevrange(self.stream, count=1)
                    self.position = text(newest[0][0]) if newest else "0-0"
                reply = await slot_xread(
                    self.redis, {self.stream: self.position}, READ_COUNT, self.block_ms
                )
            except TRANSIENT_ERRORS as exc:
                attempt += 1
                if attempt == 1:
                    self.log.warning("connection_lost", error=f"{type(exc).__name__}: {exc}")
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
                continue
            if attempt:
                attempt = 0
                self.log.info("connection_restored")
            for _stream, entries in streams_of(reply):
                for entry_id, fields in entries:
                    self.position = entry_id
                    await self._deliver(entry_id, fields)

    async def _deliver(self, entry_id: str, fields: Any) -> None:
        if fields is None:
            return  # deleted entry
        env = decode_payload(payload_of(fields), self.limit)
        if isinstance(env, Malformed):
            self.log.warning("malformed_entry", id=entry_id, reason=env.reason, error=env.error)
            return
        try:
            if self.arity == 2:
                await self.callback(env, self.redis)
            else:
                await self.callback(env)
        except Exception as exc:
            self.log.error("callback_failed", id=entry_id, error=repr(exc), exc_info=exc)
