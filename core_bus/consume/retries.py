"""Retry scheduling: failed entries wait out their backoff, then are XCLAIMed again.

Re-claiming (not just re-running) makes Redis count the attempt: the delivery
counter, which survives restarts, decides when an entry is poison.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable

import anyio

from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.pending import HeldEntry


class RetryScheduler:
    """A due-time heap of held entries and the loop that hands them back when due."""

    def __init__(
        self,
        reclaim: Callable[[list[HeldEntry]], Awaitable[None]],
        *,
        batch: int,
        watch: ConnectionWatch,
    ) -> None:
        self._reclaim = reclaim
        self._batch = batch
        self._watch = watch
        self._heap: list[tuple[float, int, HeldEntry]] = []
        self._seq = itertools.count()
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, entry: HeldEntry, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), entry))
        self._event.set()

    async def run(self) -> None:
        attempt = 0
        while True:
            if not self._heap:
                self._event.clear()
                await self._event.wait()
                continue
            wait = self._heap[0][0] - time.monotonic()
            if wait > 0:
                self._event.clear()
                with anyio.move_on_after(wait):
                    await self._event.wait()
                continue
            due: list[HeldEntry] = []
            while self._heap and self._heap[0][0] <= time.monotonic() and len(due) < self._batch:
                due.append(heapq.heappop(self._heap)[2])
            try:
                await self._reclaim(due)
                attempt = 0
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "retry")
                attempt += 1
                for entry in due:
                    self.schedule(entry, RECONNECT_BACKOFF.delay(attempt))
