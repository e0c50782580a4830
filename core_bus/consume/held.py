"""The entries one subscription holds, and the lock around its pending list.

An entry is *held* from the moment this process took it (a read, a claim, a
pending-list check) until it is acked, dead-lettered, or dropped (on stop, or
when it turned out to be no longer ours); meanwhile no check of our own
pending list hands it out a second time. :class:`HeldEntries` is the only
owner of that set: every hold and release goes through it. Paths that can
time out or fail release in ``finally``/``except`` blocks or keep the entry
held on purpose while a retry is pending (dead letters waiting for Redis).

The lock is held while our pending list in Redis is compared with the set
and while acks or dead letters remove entries from both, so a check never
sees an entry that is acked in Redis but still in its XPENDING reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class HeldEntries:
    """Entry ids held per stream (see the module docstring)."""

    __slots__ = ("_by_stream", "lock")

    def __init__(self, streams: Iterable[str]) -> None:
        self._by_stream: dict[str, set[str]] = {stream: set() for stream in streams}
        self.lock = asyncio.Lock()

    def track(self, stream: str) -> None:
        """Hold entries of ``stream`` too from now on (a stream added to a running subscription)."""
        self._by_stream.setdefault(stream, set())

    def __len__(self) -> int:
        return sum(map(len, self._by_stream.values()))

    def hold(self, stream: str, entry_id: str) -> bool:
        """Take one entry; False when it is held already (then it must not be queued again)."""
        ids = self._by_stream[stream]
        if entry_id in ids:
            return False
        ids.add(entry_id)
        return True

    def hold_new(self, stream: str, entry_ids: Iterable[str]) -> set[str]:
        """Take the entries not held yet and return them."""
        ids = self._by_stream[stream]
        fresh = {entry_id for entry_id in entry_ids if entry_id not in ids}
        ids.update(fresh)
        return fresh

    def snapshot(self) -> list[tuple[str, list[str]]]:
        """``[(stream, ids held)]`` right now (for lease renewals)."""
        return [(stream, list(ids)) for stream, ids in self._by_stream.items() if ids]

    def release(self, stream: str, entry_id: str) -> None:
        self._by_stream[stream].discard(entry_id)

    def release_many(self, stream: str, entry_ids: Iterable[str]) -> None:
        self._by_stream[stream].difference_update(entry_ids)

    def release_all(self) -> int:
        """The subscription ended: what was not acked stays pending in Redis only."""
        count = len(self)
        for ids in self._by_stream.values():
            ids.clear()
        return count
