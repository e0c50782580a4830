"""Finding the streams that match glob patterns, now and as they are created.

Two sources, neither a busy loop: the discovery notices ``publish_envelope``
writes on a stream's first publish (followed with a blocking XREAD, so a new
stream is seen within a round trip) and ``SCAN ... TYPE stream`` every
``poll_delay`` seconds (streams created by a plain XADD, or whose notice was
trimmed). The finder only reports; what to do with a stream is its owner's
job (:mod:`core_bus.discovery`). Dead-letter streams and the notices stream
itself never match.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.backoff import Backoff
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.patterns import glob_match
from core_bus.streams.replies import streams_of, text
from core_bus.streams.slots import xread as slot_xread

NOTICE_BLOCK_SECONDS = 2.0
NOTICE_COUNT = 500
SCAN_COUNT = 1000
RETRY = Backoff(base=0.1, cap=5.0)

#: Called with the streams found in one round (a SCAN or a batch of notices).
OnFound = Callable[[list[str]], Awaitable[None]]


class StreamFinder:
    """Reports every stream matching ``patterns`` to ``on_found`` (the owner drops repeats)."""

    def __init__(
        self,
        redis: AsyncRedis,
        patterns: Sequence[str],
        on_found: OnFound,
        *,
        poll_delay: float,
        keys: StreamKeyBuilder,
        log: Any,
    ) -> None:
        self.redis = redis
        self.patterns = list(patterns)
        self.poll_delay = poll_delay
        self.scans = 0  # completed SCAN rounds (initial, poll, refresh)
        self._on_found = on_found
        self._notices = keys.discovery_stream()
        self._excluded_prefix = keys.dead_letter("")
        self._position = "0-0"
        self._log = log

    def matches(self, stream: str) -> bool:
        if stream == self._notices or stream.startswith(self._excluded_prefix):
            return False
        return any(glob_match(p, stream) for p in self.patterns)

    async def scan(self) -> list[str]:
        """Every matching stream that exists now (one SCAN cursor loop per pattern)."""
        found: dict[str, None] = {}
        for pattern in self.patterns:
            async for key in self.redis.scan_iter(match=pattern, count=SCAN_COUNT, _type="stream"):
                name = text(key)
                if self.matches(name):
                    found[name] = None
        self.scans += 1
        return list(found)

    async def refresh(self) -> None:
        """SCAN now and report what was found."""
        await self._on_found(await self.scan())

    async def initial(self) -> None:
        """Position on the notices, then SCAN: nothing created in between is missed."""
        newest = await self.redis.xrevrange(self._notices, count=1)
        self._position = text(newest[0][0]) if newest else "0-0"
        await self.refresh()

    async def follow(self) -> None:
        """Follow the notices and poll with SCAN until cancelled (retrying while Redis is away)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.retrying, self._follow_notices)
            tg.start_soon(self.retrying, self._poll)

    async def retrying(
        self,
        step: Callable[[], Awaitable[None]],
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        """Run ``step`` to completion, backing off while Redis is unreachable (logged
        once; ``on_unavailable`` runs then too, e.g. to report a start that waits)."""
        attempt = 0
        while True:
            try:
                await step()
                return
            except TRANSIENT_ERRORS as exc:
                attempt += 1
                if attempt == 1:
                    self._log.warning("discovery_redis_unavailable", error=repr(exc))
                    if on_unavailable is not None:
                        on_unavailable()
                await anyio.sleep(RETRY.delay(attempt))

    async def _follow_notices(self) -> None:
        while True:
            reply = await slot_xread(
                self.redis,
                {self._notices: self._position},
                NOTICE_COUNT,
                blocking_ms(self.redis, NOTICE_BLOCK_SECONDS),
            )
            found: dict[str, None] = {}
            for _stream, entries in streams_of(reply):
                for entry_id, fields in entries:
                    self._position = entry_id
                    if fields is not None and "stream" in fields:
                        name = text(fields["stream"])
                        if self.matches(name):
                            found[name] = None
            if found:
                await self._on_found(list(found))

    async def _poll(self) -> None:
        while True:
            await anyio.sleep(self.poll_delay)
            await self.refresh()
