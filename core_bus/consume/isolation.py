"""Running crash suspects one at a time, alone (see :mod:`core_bus.consume.suspects`).

While suspects wait, the runner's gate is closed: workers start no new
handler, the isolator waits until the running ones finished, then runs each
suspect by itself after recording in Redis (and telling ``on_isolation``,
the built-in worker's notify datagram) which entry it is. If the process dies
now, that entry alone is to blame. An isolated run that ends normally clears
the suspect; the gate opens again once no suspect waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.held import HeldEntries
from core_bus.consume.runner import HandlerRunner
from core_bus.consume.stats import SubscriptionStats
from core_bus.consume.suspects import clear_suspect, mark_isolating
from core_bus.consume.workqueue import Work
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.errors import TRANSIENT_ERRORS


class Isolator:
    """The queue of crash suspects of one subscription and the task that runs them."""

    def __init__(
        self,
        redis: AsyncRedis,
        runner: HandlerRunner,
        *,
        key: str,
        consumer: str,
        held: HeldEntries,
        stats: SubscriptionStats,
        watch: ConnectionWatch,
        log: Any,
    ) -> None:
        self._r = redis
        self._runner = runner
        self._key = key
        self._consumer = consumer
        self._held = held
        self._stats = stats
        self._watch = watch
        self._log = log
        self.suspects: deque[Work] = deque()
        self._wake = anyio.Event()
        #: called with "<stream> <id>" before a suspect's handler starts, None after
        self.on_isolation: Callable[[str | None], None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def add(self, works: list[Work]) -> None:
        if works:
            self.suspects.extend(works)
            self._runner.isolating = True  # close the gate at once
            self._runner.gate.clear()
            self._wake.set()

    def drop(self, stream: str, gone: set[str]) -> None:
        kept = [w for w in self.suspects if w[0] != stream or w[1] not in gone]
        self.suspects.clear()
        self.suspects.extend(kept)

    def release_all(self) -> None:
        """On stop: queued suspects stay pending (and suspect) in Redis."""
        for work in self.suspects:
            self._held.release(work[0], work[1])
        self.suspects.clear()

    async def run(self) -> None:
        runner = self._runner
        while True:
            if not self.suspects:
                runner.isolating = False
                runner.gate.set()
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            runner.isolating = True
            runner.gate.clear()
            await runner.wait_quiet()
            if runner.stopping:
                self.release_all()
                continue
            work = self.suspects.popleft()
            await self._run(work)

    async def _run(self, work: Work) -> None:
        stream, entry_id = work[0], work[1]

        async def before() -> None:
            await self._mark(stream, entry_id)
            if self.on_isolation is not None:
                self.on_isolation(f"{stream} {entry_id}")

        self._stats.isolated += 1
        try:
            ran = await self._runner.run_one(work, before)
        finally:
            if self.on_isolation is not None:
                self.on_isolation(None)
        if ran:
            try:
                await clear_suspect(self._r, self._key, stream, entry_id)
            except TRANSIENT_ERRORS as exc:  # the hash expires; a later crash re-marks it
                self._watch.lost(exc, "suspects")

    async def _mark(self, stream: str, entry_id: str) -> None:
        """Record the isolated run in Redis; wait for Redis rather than run unrecorded."""
        attempt = 0
        while True:
            try:
                await mark_isolating(self._r, self._key, stream, entry_id, self._consumer)
                self._watch.restored()
                return
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "suspects")
                attempt += 1
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
