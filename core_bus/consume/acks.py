"""Batched XACKs: acks collect while a round trip is in flight and go out together.

No timer: the flusher sends whatever accumulated since its last round trip, so
under load one XACK carries a whole batch and when idle an ack leaves at once.
Failed flushes keep their ids and retry with backoff (XACK is idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.held import HeldEntries
from core_bus.consume.stats import SubscriptionStats
from core_bus.durability import Replication, check_replies, queue_wait, resolve_durability
from core_bus.errors import ReplicationTimeout
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.errors import TRANSIENT_ERRORS, is_nogroup

FLUSH_TIMEOUT = 10.0


class AckBatcher:
    """Collects ``(stream, id)`` acks of one group and flushes them pipelined."""

    def __init__(
        self,
        redis: AsyncRedis,
        group: str,
        held: HeldEntries,
        stats: SubscriptionStats,
        watch: ConnectionWatch,
    ) -> None:
        self._r = redis
        self._group = group
        self._held = held  # its lock is shared with the own-pending check (see Subscription)
        self._stats = stats
        self._watch = watch
        self.pending: dict[str, list[str]] = {}
        self.counted = 0  # acks of handled entries (count as processed once written)
        self.event = asyncio.Event()
        #: awaited before each flush (ownership re-check after a pause); set by the subscription
        self.before_flush: Callable[[], Awaitable[None]] | None = None
        #: ``REDIS_DURABILITY=replicated``: each flush ends with WAIT (same pipeline); a
        #: shortfall is logged (``ack_replication_short``), the acks stand (DELIVERY.md).
        self.replication: Replication | None = resolve_durability(None)
        self.log: Any = None

    def add(self, stream: str, entry_id: str, counted: bool) -> None:
        ids = self.pending.get(stream)
        if ids is None:
            self.pending[stream] = [entry_id]
        else:
            ids.append(entry_id)
        if counted:
            self.counted += 1
        self.event.set()

    async def run(self) -> None:
        """Flush whenever acks are waiting; back off while Redis is unreachable."""
        attempt = 0
        while True:
            await self.event.wait()
            self.event.clear()
            while self.pending:
                if self.before_flush is not None:
                    try:
                        await self.before_flush()
                    except TRANSIENT_ERRORS as exc:
                        self._watch.lost(exc, "ack")
                        attempt += 1
                        await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
                        continue
                    if not self.pending:
                        break
                if await self.flush():
                    attempt = 0
                    continue
                attempt += 1
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))

    async def flush(self) -> bool:
        """Send every waiting ack in one pipeline; False (ids kept) if Redis is unreachable."""
        async with self._held.lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        batch, counted = self.pending, self.counted
        self.pending, self.counted = {}, 0
        try:
            # Shielded: a started flush completes even when the subscription stops.
            with anyio.CancelScope(shield=True), anyio.fail_after(FLUSH_TIMEOUT):
                await self._send(batch)
        except BaseException as exc:
            for stream, ids in batch.items():
                self.pending.setdefault(stream, []).extend(ids)
            self.counted += counted
            if isinstance(exc, TRANSIENT_ERRORS):
                self._watch.lost(exc, "ack")
                return False
            if isinstance(exc, Exception) and is_nogroup(exc):
                # Redis lost the group (and its pending list): nothing left to ack.
                self.pending, self.counted = {}, 0
                for stream, ids in batch.items():
                    self._held.release_many(stream, ids)
                return True
            raise
        self._watch.restored()
        for stream, ids in batch.items():
            self._held.release_many(stream, ids)
        self._stats.processed += counted
        return True

    async def _send(self, batch: dict[str, list[str]]) -> None:
        """One XACK per stream: a plain command for one stream (the common case,
        cheaper than a pipeline object), pipelined for several. Streams whose ids
        were all dropped meanwhile (lost to the sweep) send nothing."""
        batch = {stream: ids for stream, ids in batch.items() if ids}
        if not batch:
            return
        if self.replication is not None:
            await self._send_replicated(batch, self.replication)
            return
        if len(batch) == 1:
            for stream, ids in batch.items():
                await self._r.xack(stream, self._group, *ids)
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for stream, ids in batch.items():
                pipe.xack(stream, self._group, *ids)
            await pipe.execute()

    async def _send_replicated(self, batch: dict[str, list[str]], policy: Replication) -> None:
        """XACKs and WAIT in one pipeline; too few replicas is a warning, not a retry
        (XACK already took effect on the master; sending it again changes nothing)."""
        async with self._r.pipeline(transaction=False) as pipe:
            for stream, ids in batch.items():
                pipe.xack(stream, self._group, *ids)
            waits = await queue_wait(pipe, self._r, policy)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies[: len(replies) - waits]:
            if isinstance(reply, Exception):
                raise reply
        try:
            check_replies(replies[len(replies) - waits :], policy, "ack")
        except ReplicationTimeout as exc:
            if self.log is not None:
                self.log.warning(
                    "ack_replication_short",
                    acked_replicas=exc.acked,
                    wanted_replicas=exc.wanted,
                    entries=sum(map(len, batch.values())),
                    timeout_ms=exc.timeout_ms,
                )

    async def final_flush(self, log: Any) -> None:
        """Last flush on stop, shielded from cancellation and bounded in time."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_TIMEOUT):
            attempt = 0
            try:
                while self.pending and not await self.flush():
                    attempt += 1
                    await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
            except Exception as exc:
                log.warning("final_ack_flush_failed", error=repr(exc))
        if self.pending:
            log.warning("acks_not_flushed", entries=sum(map(len, self.pending.values())))
