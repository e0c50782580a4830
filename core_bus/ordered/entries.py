"""Handling one entry of an owned ordered shard to its end (see :mod:`core_bus.ordered`).

Decode, call the handler, retry in place (the entry blocks its shard, as
order requires; each retry is an XCLAIM to ourselves, so it counts as a
delivery), then ack or dead-letter. Both writes are fenced by the shard's
lease (:mod:`core_bus.ordered.leases`) and shielded from cancellation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.decode import Malformed, decode_payload, payload_of
from core_bus.consume.handlers import Handler, handler_arity
from core_bus.consume.stats import SubscriptionStats
from core_bus.ordered.claims import redeliver
from core_bus.ordered.leases import ShardUnit, fenced_ack, fenced_dead_letter
from core_bus.ordered.options import OrderedOptions
from core_bus.streams.backoff import Backoff
from core_bus.streams.deadletter import REASON_POISON, dead_letter_fields


class ShardEntryHandler:
    """Runs the handler on shard entries for one consumer; counts into ``stats``."""

    def __init__(
        self,
        redis: AsyncRedis,
        handler: Handler,
        options: OrderedOptions,
        *,
        stats: SubscriptionStats,
        log: Any,
    ) -> None:
        self.redis = redis
        self.group = options.group
        self.consumer = options.consumer
        self.dlq_stream = options.dlq_stream
        self.stats = stats
        self._handler = handler
        self._pass_redis = handler_arity(handler) == 2
        self._max_deliveries = options.max_deliveries
        self._retry = Backoff(options.retry_backoff, options.retry_backoff_max)
        self._limit = options.max_envelope_bytes
        self._log = log

    async def handle(
        self,
        unit: ShardUnit,
        entry_id: str,
        fields: Any,
        deliveries: int,
        giving_up: Callable[[], bool],
    ) -> bool:
        """Handle one entry to its end; False when the shard's lease turned out lost.

        ``giving_up()`` is asked between retries: when true the entry stays
        pending for the next owner (or for us, later).
        """
        if fields is None:  # deleted or trimmed while pending
            return await self._ack(unit, entry_id, counted=False)
        if deliveries > self._max_deliveries:
            msg = f"delivered {deliveries} times (limit {self._max_deliveries})"
            return await self._dead_letter(unit, entry_id, fields, REASON_POISON, msg, deliveries)
        env = decode_payload(payload_of(fields), self._limit)
        if isinstance(env, Malformed):
            self.stats.malformed += 1
            return await self._dead_letter(
                unit, entry_id, fields, env.reason, env.error, deliveries
            )
        env.add_hop(self.group)
        while True:
            error = await self._call(env)
            if error is None:
                return await self._ack(unit, entry_id, counted=True)
            if deliveries >= self._max_deliveries:
                return await self._dead_letter(
                    unit, entry_id, fields, REASON_POISON, error, deliveries
                )
            await anyio.sleep(self._retry.delay(deliveries))
            if giving_up():
                return True  # stays pending; the next owner (or we, later) retries it
            deliveries = await redeliver(
                self.redis, unit.stream, self.group, self.consumer, entry_id
            )
            if deliveries == 0:
                return True  # no longer ours (acked or claimed elsewhere)

    async def _call(self, env: Any) -> str | None:
        stats = self.stats
        stats.in_flight += 1
        started = time.perf_counter()
        try:
            if self._pass_redis:
                await self._handler(env, self.redis)
            else:
                await self._handler(env)
        except Exception as exc:
            stats.failed += 1
            self._log.warning("handler_failed", error=f"{type(exc).__name__}: {exc}")
            return f"{type(exc).__name__}: {exc}"
        finally:
            stats.in_flight -= 1
            stats.observe_handler(time.perf_counter() - started)
        return None

    async def _ack(self, unit: ShardUnit, entry_id: str, *, counted: bool) -> bool:
        with anyio.CancelScope(shield=True):
            ours = await fenced_ack(self.redis, unit, self.consumer, self.group, entry_id)
        if not ours:
            return False
        if counted:
            self.stats.processed += 1
        return True

    async def _dead_letter(
        self, unit: ShardUnit, entry_id: str, fields: Any, reason: str, error: str, deliveries: int
    ) -> bool:
        record = dead_letter_fields(
            data=payload_of(fields),
            original=fields,
            reason=reason,
            error=error,
            deliveries=deliveries,
            source_stream=unit.stream,
            source_id=entry_id,
            group=self.group,
            consumer=self.consumer,
        )
        with anyio.CancelScope(shield=True):
            ours = await fenced_dead_letter(
                self.redis, unit, self.dlq_stream, self.consumer, self.group, entry_id, record
            )
        if not ours:
            return False
        self.stats.dead_lettered += 1
        self._log.warning(
            "entry_dead_lettered", stream=unit.stream, entry_id=entry_id, reason=reason
        )
        return True
