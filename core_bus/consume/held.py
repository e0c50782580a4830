"""The entries one subscription holds, and the lock around its pending list.

An entry is *held* from the moment this process took it (a read, a claim, a
pending-list check) until it is acked, dead-lettered, or dropped (on stop, or
when it turned out to be no longer ours); meanwhile no check of our own
pending list hands it out a second time. :class:`HeldEntries` is the only
owner of that set: every hold and release goes through it, and
:meth:`HeldEntries.releasing` makes a release that a timeout or an exception
cannot skip.

The lock is held while our pending list in Redis is compared with the set
and while acks or dead letters remove entries from both, so a check never
sees an entry that is acked in Redis but still in its XPENDING reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class HeldEntries:
    """Entry ids held per stream (see the module docstring)."""

    __slots__ = ("_by_stream", "lock")

    def __init__(self, streams: Iterable[str]) -> None:
        self._by_stream: dict[str, set[str]] = {stream: set() for stream in streams}
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return sum(map(len, self._by_stream.values()))

    def holds(self, stream: str, entry_id: str) -> bool:
        return entry_id in self._by_stream[stream]

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

    def release(self, stream: str, entry_id: str) -> None:
        self._by_stream[stream].discard(entry_id)

    def release_many(self, stream: str, entry_ids: Iterable[str]) -> None:
        self._by_stream[stream].difference_update(entry_ids)

    @contextmanager
    def releasing(self, pairs: Iterable[tuple[str, str]]) -> Iterator[None]:
        """Release ``(stream, id)`` pairs when the block ends, however it ends."""
        try:
            yield
        finally:
            for stream, entry_id in pairs:
                self._by_stream[stream].discard(entry_id)

    def snapshot(self) -> dict[str, set[str]]:
        """A copy of what is held (tests and diagnostics)."""
        return {stream: set(ids) for stream, ids in self._by_stream.items()}
