"""Dead-lettering held entries: XADD to the dead-letter stream + XACK in one MULTI/EXEC.

A write that fails because Redis is unreachable, or does not answer within
:data:`WRITE_TIMEOUT` (a paused or overloaded server), is not dropped: its
entries stay held (so no pending-list check hands them to a handler again)
and :meth:`DeadLetterWriter.run` writes them once Redis answers. Before a
retry each entry's pending row is looked at: one that is no longer pending
for us was already acked (the timed-out MULTI/EXEC did run after all) or
claimed by someone else, and is only released. On stop, entries still
waiting are released; they remain pending in Redis with their delivery
counter, so the next reader dead-letters them without running them again.
"""

from __future__ import annotations

from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.decode import payload_of
from core_bus.consume.held import HeldEntries
from core_bus.consume.options import SubscriptionOptions
from core_bus.consume.stats import SubscriptionStats
from core_bus.durability import Replication, resolve_durability, wait_replicated
from core_bus.errors import ReplicationTimeout
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.deadletter import (
    TrimReport,
    dead_letter_fields,
)
from core_bus.streams.dlqwrite import write_dead_letters
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.pending import HeldEntry, pending_rows

#: Seconds one dead-letter MULTI/EXEC may take before it is retried later.
WRITE_TIMEOUT = 10.0

#: (entry, reason constant from core_bus.streams.deadletter, error text)
DeadLetterJob = tuple[HeldEntry, str, str]


class DeadLetterWriter:
    """Writes the dead letters of one subscription; shielded so a stop cannot split them."""

    def __init__(
        self,
        redis: AsyncRedis,
        held: HeldEntries,
        options: SubscriptionOptions,
        *,
        stats: SubscriptionStats,
        watch: ConnectionWatch,
        log: Any,
    ) -> None:
        self._r = redis
        self._held = held
        self.dlq_stream = options.dlq_stream
        self._group = options.group
        self._consumer = options.consumer
        self._stats = stats
        self._watch = watch
        self._log = log
        self._maxlen = options.dead_letter_maxlen
        self.trims = TrimReport(log)
        self._waiting: list[DeadLetterJob] = []
        self._wake = anyio.Event()
        #: ``REDIS_DURABILITY=replicated``: WAIT after each MULTI/EXEC (like acks: too few
        #: replicas is logged, the dead letter and its ack stand).
        self.replication: Replication | None = resolve_durability(None)

    @property
    def waiting(self) -> int:
        """Dead letters not written yet (Redis was unreachable)."""
        return len(self._waiting)

    async def write(self, jobs: list[DeadLetterJob]) -> bool:
        """Dead-letter and ack ``jobs`` atomically; False if it must wait for Redis.

        Written entries are released; the others wait, still held, for :meth:`run`.
        """
        if await self._attempt(jobs):
            return True
        self._waiting.extend(jobs)
        self._wake.set()
        return False

    async def run(self) -> None:
        """Retry waiting dead letters with backoff until Redis takes them."""
        attempt = 0
        while True:
            if not self._waiting:
                attempt = 0
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            attempt += 1
            await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
            jobs, self._waiting = self._waiting, []
            try:
                jobs = await self._still_ours(jobs)
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "dead_letter")
                self._waiting = jobs + self._waiting
                continue
            if jobs and not await self._attempt(jobs):
                self._waiting = jobs + self._waiting

    def give_up(self) -> None:
        """On stop: release what still waits (it stays pending in Redis)."""
        jobs, self._waiting = self._waiting, []
        for entry, _reason, _error in jobs:
            self._held.release(entry.stream, entry.entry_id)
        if jobs:
            self._log.warning("dead_letters_not_written", entries=len(jobs))

    async def _attempt(self, jobs: list[DeadLetterJob]) -> bool:
        failure: BaseException = TimeoutError("dead-letter write not answered")
        written = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
            async with self._held.lock:
                try:
                    await self._execute(jobs)
                    written = True
                except TRANSIENT_ERRORS as exc:
                    failure = exc
                if written:
                    for entry, _reason, _error in jobs:
                        self._held.release(entry.stream, entry.entry_id)
        if not written:
            self._watch.lost(failure, "dead_letter")
            return False
        self._watch.restored()
        for entry, reason, error in jobs:
            self._stats.dead_lettered += 1
            self._log.warning(
                "dead_lettered",
                source_stream=entry.stream,
                entry_id=entry.entry_id,
                reason=reason,
                deliveries=entry.deliveries,
                error=error,
                dlq_stream=self.dlq_stream,
            )
        return True

    async def _still_ours(self, jobs: list[DeadLetterJob]) -> list[DeadLetterJob]:
        """The jobs whose entries are still pending for this consumer; release the rest."""
        async with self._r.pipeline(transaction=False) as pipe:
            for entry, _reason, _error in jobs:
                pipe.xpending_range(entry.stream, self._group, entry.entry_id, entry.entry_id, 1)
            replies = await pipe.execute()
        keep: list[DeadLetterJob] = []
        for job, reply in zip(jobs, replies, strict=True):
            rows = pending_rows(reply)
            if rows and rows[0][1] == self._consumer:
                keep.append(job)
            else:
                self._held.release(job[0].stream, job[0].entry_id)
        return keep

    async def _execute(self, jobs: list[DeadLetterJob]) -> None:
        records = [
            (
                entry.stream,
                entry.entry_id,
                dead_letter_fields(
                    data=payload_of(entry.fields or {}),
                    original=entry.fields,
                    reason=reason,
                    error=error,
                    deliveries=entry.deliveries,
                    source_stream=entry.stream,
                    source_id=entry.entry_id,
                    group=self._group,
                    consumer=self._consumer,
                ),
            )
            for entry, reason, error in jobs
        ]
        trimmed = await write_dead_letters(
            self._r, self.dlq_stream, self._group, records, self._maxlen
        )
        if self._maxlen != 0:
            self.trims.add(self.dlq_stream, trimmed, self._maxlen)
            self._stats.dlq_trimmed = self.trims.trimmed
        if self.replication is not None:
            await self._wait_replicated(self.replication, len(jobs))

    async def _wait_replicated(self, policy: Replication, entries: int) -> None:
        """WAIT after the MULTI/EXEC (inside MULTI it would not block): its own round trip,
        on the rare dead-letter path. A transient error here is not a failed write."""
        try:
            await wait_replicated(self._r, policy, "dead letter")
        except ReplicationTimeout as exc:
            self._log.warning(
                "dead_letter_replication_short",
                acked_replicas=exc.acked,
                wanted_replicas=exc.wanted,
                entries=entries,
                timeout_ms=exc.timeout_ms,
            )
        except TRANSIENT_ERRORS as exc:
            self._log.warning("dead_letter_replication_unknown", error=repr(exc), entries=entries)
