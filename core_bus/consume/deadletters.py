"""Dead-lettering held entries: XADD to the dead-letter stream + XACK in one MULTI/EXEC."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio

from core_bus.consume.decode import payload_of
from core_bus.consume.stats import SubscriptionStats
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.deadletter import dead_letter_fields, queue_dead_letter
from core_bus.streams.pending import HeldEntry

WRITE_TIMEOUT = 10.0

#: (entry, reason constant from core_bus.streams.deadletter, error text)
DeadLetterJob = tuple[HeldEntry, str, str]


class DeadLetterWriter:
    """Writes dead letters of one subscription; shielded so a stop cannot split them."""

    def __init__(
        self,
        redis: Any,
        lock: asyncio.Lock,
        local: dict[str, set[str]],
        *,
        dlq_stream: str,
        group: str,
        consumer: str,
        stats: SubscriptionStats,
        watch: ConnectionWatch,
        log: Any,
        transient: tuple[type[BaseException], ...],
    ) -> None:
        self._r = redis
        self._lock = lock  # the subscription's PEL lock (see Subscription._check_own_pending)
        self._local = local
        self.dlq_stream = dlq_stream
        self._group = group
        self._consumer = consumer
        self._stats = stats
        self._watch = watch
        self._log = log
        self._transient = transient

    async def write(self, jobs: list[DeadLetterJob]) -> bool:
        """Dead-letter and ack ``jobs`` atomically; False if Redis was unreachable.

        Either way the entries are no longer held locally: on failure they are
        still pending in Redis and the next own-pending check finds them again.
        """
        written = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
            async with self._lock:
                try:
                    await self._execute(jobs)
                    written = True
                except self._transient as exc:
                    self._watch.lost(exc, "dead_letter")
                for entry, _reason, _error in jobs:
                    self._local[entry.stream].discard(entry.entry_id)
        if written:
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
        return written

    async def _execute(self, jobs: list[DeadLetterJob]) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            for entry, reason, error in jobs:
                fields = dead_letter_fields(
                    data=payload_of(entry.fields or {}),
                    reason=reason,
                    error=error,
                    deliveries=entry.deliveries,
                    source_stream=entry.stream,
                    source_id=entry.entry_id,
                    group=self._group,
                    consumer=self._consumer,
                )
                queue_dead_letter(
                    pipe,
                    self.dlq_stream,
                    stream=entry.stream,
                    group=self._group,
                    entry_id=entry.entry_id,
                    fields=fields,
                )
            await pipe.execute()
