"""The queue between a subscription's reader and its workers.

Entries wait here after a read until a worker takes them. Two rules keep it
cheap and bounded:

- wake one idle worker at a time: a worker that takes an entry while more wait
  wakes one sibling, which runs only once the first yields. A fast handler
  drains a whole batch without task switches; slow handlers spread out over
  every worker.
- backpressure: the reader reads again only while at most ``low_water``
  entries wait (so one batch is prefetched while the previous one is handled).
"""

from __future__ import annotations

import asyncio
from collections import deque

from core_bus.streams.pending import RawFields

#: Queued work: (stream, entry id, raw fields or None if deleted, delivery number,
#: receive hop for the trace: ``"group:<epoch>"`` as ``env.add_hop(group)`` makes
#: it, taken when the entry was read, one string shared by a whole read batch)
Work = tuple[str, str, RawFields, int, str]


class WorkQueue:
    """FIFO of :data:`Work` with one-at-a-time worker wakeups and a reader gate."""

    def __init__(self, low_water: int) -> None:
        self.items: deque[Work] = deque()
        self.low_water = low_water
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.woken = 0  # workers woken that have not run yet
        self.space = asyncio.Event()
        self.reader_waiting = False

    def __len__(self) -> int:
        return len(self.items)

    def put(self, work: Work) -> None:
        self.items.append(work)
        self.wake_one()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.woken += 1
                return

    def took_one(self) -> None:
        """Bookkeeping after a worker popped an entry (inlined on the worker's hot path)."""
        if self.items and self.waiters and not self.woken:
            self.wake_one()
        if self.reader_waiting and len(self.items) <= self.low_water:
            self.space.set()

    async def wait_for_work(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter.done() and not waiter.cancelled():
                self.woken -= 1
            else:
                waiter.cancel()

    def needs_space(self) -> bool:
        return len(self.items) > self.low_water

    async def wait_for_space(self) -> None:
        """Wait until the workers took enough entries (``space`` is set by took_one)."""
        self.space.clear()
        self.reader_waiting = True
        try:
            await self.space.wait()
        finally:
            self.reader_waiting = False

    def clear(self) -> list[Work]:
        """Remove and return everything still waiting (on stop: it stays pending in Redis)."""
        dropped = list(self.items)
        self.items.clear()
        return dropped
