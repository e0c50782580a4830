"""Consuming streams with a consumer group: at-least-once, batched, bounded, restartable.

One :class:`Subscription` owns one asyncio task that runs an anyio task group:
the reader (history first, then ``>`` in batches, plus own-pending checks),
``concurrency`` workers running the handler, a batched ack flusher and a retry
scheduler. The Redis pending list is the source of truth: whatever this process
does not finish stays pending and is found again (after a restart, a reconnect,
or by a sibling through the supervisor's reclaim).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core_bus.backoff import Backoff
from core_bus.connwatch import ConnectionWatch
from core_bus.deadletter import REASON_POISON, dead_letter_fields, queue_dead_letter
from core_bus.decode import Malformed, decode_payload, payload_of
from core_bus.errors import BusError
from core_bus.handlers import Handler, handler_arity
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.pending import RawFields, fetch_entries, history_page, own_pending, reclaim_for_retry
from core_bus.replies import text
from core_bus.settings import get_settings
from core_bus.stats import SubscriptionStats

#: Errors meaning "Redis is unreachable right now": back off and retry, never fail.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
)
RECONNECT_BACKOFF = Backoff(base=0.05, cap=5.0)
SHIELDED_WRITE_TIMEOUT = 10.0

# Subscriptions still running. Strong references: a caller may drop the handle
# (the seed's dynamic_subscribe does) and asyncio keeps tasks only weakly.
_LIVE: set[Subscription] = set()


def default_consumer_name() -> str:
    """``host:pid:random``: unique per incarnation, says where it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def ensure_group(redis: Any, stream: str, group: str, start_id: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream), tolerating BUSYGROUP."""
    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class _Item:
    """One entry this process is responsible for until it is acked or dead-lettered."""

    __slots__ = ("deliveries", "entry_id", "fields", "retry_delay", "stream")

    def __init__(self, stream: str, entry_id: str, fields: RawFields, deliveries: int) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.fields = fields
        self.deliveries = deliveries
        self.retry_delay = 0.0


class Subscription:
    """Handle of a running subscription (see :func:`subscribe`)."""

    def __init__(
        self,
        redis: Any,
        streams: list[str],
        handler: Handler,
        *,
        group: str,
        consumer: str,
        concurrency: int,
        count: int,
        block_ms: int,
        max_deliveries: int,
        retry_backoff: float,
        retry_backoff_max: float,
        dlq_stream: str,
        group_start_id: str,
        pending_check_interval: float,
        max_envelope_bytes: int,
    ) -> None:
        if concurrency < 1 or count < 1 or max_deliveries < 1 or block_ms < 1:
            raise ValueError("concurrency, count, max_deliveries and block_ms must be >= 1")
        self.consumer = consumer
        self.group = group
        self.streams = streams
        self.stats = SubscriptionStats()
        self.dlq_stream = dlq_stream
        self._user_redis = redis
        self._r = redis
        self._handler = handler
        self._pass_redis = handler_arity(handler) == 2
        self._concurrency = concurrency
        self._count = count
        self._block_ms = block_ms
        self._max_deliveries = max_deliveries
        self._retry = Backoff(retry_backoff, retry_backoff_max)
        self._group_start_id = group_start_id
        self._check_interval = pending_check_interval
        self._limit = max_envelope_bytes
        self._log = get_logger(
            "core_bus.subscription", stream=",".join(streams), group=group, consumer=consumer
        )
        self._watch = ConnectionWatch(self._log, self.stats)
        # stream name as redis-py returns it (bytes or str) -> our str
        self._names: dict[Any, str] = {}
        for name in streams:
            self._names[name] = name
            self._names[name.encode()] = name
        self._read_spec = dict.fromkeys(streams, ">")
        # Entries we hold (queued, running, awaiting retry, ack or dead-letter).
        self._local: dict[str, set[str]] = {name: set() for name in streams}
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._space = asyncio.Event()
        self._busy = 0
        self._idle = asyncio.Event()
        self._acks: dict[str, list[str]] = {}
        self._acks_counted = 0
        self._ack_event = asyncio.Event()
        self._retry_heap: list[tuple[float, int, _Item]] = []
        self._retry_seq = itertools.count()
        self._retry_event = asyncio.Event()
        self._check_requested = False
        self._wait_scope: anyio.CancelScope | None = None
        self._stop_scope: anyio.CancelScope | None = None
        self._stopping = False
        self._drain_timeout = 10.0
        self._started = asyncio.Event()
        self._done = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    # -- public handle ------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from start until stop() is called or the subscription failed."""
        return self._task is not None and not self._done.is_set() and not self._stopping

    async def started(self) -> None:
        """Return once connected and every group exists; raise if it failed first."""
        await self._started.wait()
        if self._error is not None:
            raise self._error
        if self._done.is_set() and not self._stopping:
            raise BusError("subscription ended before it started")

    async def wait(self) -> None:
        """Wait until stopped or failed; re-raises a fatal error."""
        await self._done.wait()
        if self._error is not None:
            raise self._error

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop reading, let running handlers finish (up to ``drain_timeout``), flush acks.

        Entries not finished by then stay pending (and are reclaimed by
        siblings). Re-raises a fatal error the subscription had hit.
        """
        if self._task is None:
            return
        if not self._stopping:
            self._drain_timeout = drain_timeout
            self._stopping = True
            if self._stop_scope is not None:
                self._stop_scope.cancel()
            self._space.set()
            self._idle.set()
        await self.wait()

    def check_pending(self) -> None:
        """Look at our own pending list now (entries claimed to us by someone else).

        Non-blocking; only sets a flag and interrupts the reader's wait, so it
        is safe to call from a signal-driven task.
        """
        self._check_requested = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- lifecycle ----------------------------------------------------------------
    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._main(), name=f"subscription:{self.group}:{self.consumer}"
        )
        _LIVE.add(self)

    async def _main(self) -> None:
        try:
            try:
                async with anyio.create_task_group() as services:
                    services.start_soon(self._ack_loop)
                    services.start_soon(self._retry_loop)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self._concurrency):
                            workers.start_soon(self._worker)
                        await self._read_loop()
                        await self._drain()
                        workers.cancel_scope.cancel()
                    services.cancel_scope.cancel()
            finally:
                await self._final_flush()
        except asyncio.CancelledError:
            self._log.info("subscription_cancelled")
            raise
        except BaseException as exc:
            self._error = _unwrap(exc)
            self._log.error("subscription_failed", error=repr(self._error), exc_info=self._error)
        else:
            self._log.info("subscription_stopped", **self.stats.to_dict())
        finally:
            self._started.set()
            self._done.set()
            _LIVE.discard(self)

    async def _read_loop(self) -> None:
        with anyio.CancelScope() as scope:
            self._stop_scope = scope
            if self._stopping:
                scope.cancel()
            await self._guarded(self._connect)
            self._started.set()
            self._log.info("subscription_started", concurrency=self._concurrency)
            await self._guarded(self._recover_history)
            next_check = time.monotonic() + self._check_interval
            while True:
                if self._check_requested or time.monotonic() >= next_check:
                    self._check_requested = False
                    next_check = time.monotonic() + self._check_interval
                    await self._guarded(self._check_own_pending)
                await self._wait_for_space()
                block = max(1, min(self._block_ms, int((next_check - time.monotonic()) * 1000)))
                await self._guarded(self._read_new, block)

    async def _guarded(self, step: Any, *args: Any) -> None:
        """Run one reader step; on connection loss back off until Redis answers again."""
        attempt = 0
        while True:
            try:
                await step(*args)
                self._watch.restored()
                return
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "read")
                self._check_requested = True  # a lost reply may have delivered entries to us
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                self._log.warning("group_missing", error=str(exc))
                await self._connect()
                continue
            attempt += 1
            await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
            if step != self._read_new:
                continue
            return  # the read loop re-checks our pending list before the next read

    async def _connect(self) -> None:
        for stream in self.streams:
            await ensure_group(self._r, stream, self.group, self._group_start_id)

    # -- reading ------------------------------------------------------------------
    async def _wait_for_space(self) -> None:
        while self._queue.qsize() >= self._count and not self._check_requested:
            self._space.clear()
            with anyio.CancelScope() as scope:
                self._wait_scope = scope
                await self._space.wait()
            self._wait_scope = None

    async def _read_new(self, block_ms: int) -> None:
        reply: Any = None
        with anyio.CancelScope() as scope:
            self._wait_scope = scope
            if self._check_requested:
                scope.cancel()
            reply = await self._r.xreadgroup(
                self.group, self.consumer, self._read_spec, count=self._count, block=block_ms
            )
        self._wait_scope = None
        if reply:
            self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        """Queue a fresh XREADGROUP ``>`` batch (delivery number 1 each)."""
        pairs = reply.items() if isinstance(reply, dict) else reply
        put = self._queue.put_nowait
        for raw_stream, entries in pairs:
            stream = self._names.get(raw_stream) or text(raw_stream)
            local = self._local[stream]
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if entry_id in local:
                    continue
                local.add(entry_id)
                put(_Item(stream, entry_id, fields if fields else None, 1))

    async def _recover_history(self) -> None:
        """Our own pending entries first (recovery after a restart).

        The counter is read before the history read bumps it: an entry already
        delivered ``max_deliveries`` times is dead-lettered without running the
        handler again.
        """
        recovered = 0
        for stream in self.streams:
            after = "0"
            while True:
                await self._wait_for_space()
                counts, entries = await history_page(
                    self._r, stream, self.group, self.consumer, after, self._count
                )
                if not entries:
                    break
                poison: list[tuple[_Item, str]] = []
                local = self._local[stream]
                for entry_id, fields in entries:
                    after = entry_id
                    if entry_id in local:
                        continue
                    local.add(entry_id)
                    before = counts.get(entry_id, 0)
                    item = _Item(stream, entry_id, fields, before + 1)
                    if fields is not None and before >= self._max_deliveries:
                        msg = f"already delivered {before} times (limit {self._max_deliveries})"
                        poison.append((item, msg))
                    else:
                        self._queue.put_nowait(item)
                        recovered += 1
                if poison:
                    await self._dead_letter_many([(i, REASON_POISON, e) for i, e in poison])
        if recovered:
            self._log.info("pending_recovered", entries=recovered)

    async def _check_own_pending(self) -> None:
        """Process own pending entries we do not hold (claimed to us by another client).

        Costs one pipelined XPENDING when there is nothing to do. Payloads come
        from XRANGE: the claim that gave us the entry already counted as a delivery.
        """
        pending = await own_pending(self._r, self.streams, self.group, self.consumer)
        wanted: list[tuple[str, str]] = []
        counts: dict[tuple[str, str], int] = {}
        for stream, rows in pending.items():
            local = self._local[stream]
            for entry_id, delivered in rows:
                if entry_id not in local:
                    wanted.append((stream, entry_id))
                    counts[(stream, entry_id)] = delivered
        if not wanted:
            return
        poison: list[tuple[_Item, str, str]] = []
        for stream, entry_id, fields in await fetch_entries(self._r, wanted):
            local = self._local[stream]
            if entry_id in local:
                continue
            local.add(entry_id)
            delivered = counts[(stream, entry_id)]
            item = _Item(stream, entry_id, fields, delivered)
            if fields is not None and delivered > self._max_deliveries:
                msg = f"delivered {delivered} times (limit {self._max_deliveries})"
                poison.append((item, REASON_POISON, msg))
            else:
                self._queue.put_nowait(item)
        self._log.info("pending_claimed", entries=len(wanted))
        if poison:
            await self._dead_letter_many(poison)

    # -- handling -----------------------------------------------------------------
    async def _worker(self) -> None:
        get = self._queue.get
        while True:
            item = await get()
            if self._queue.qsize() < self._count:
                self._space.set()
            if self._stopping:
                self._local[item.stream].discard(item.entry_id)
                continue
            self._busy += 1
            try:
                await self._process(item)
            finally:
                self._busy -= 1
                if self._busy == 0 and self._stopping:
                    self._idle.set()

    async def _process(self, item: _Item) -> None:
        fields = item.fields
        if fields is None:  # deleted / trimmed while pending: nothing to process
            self._ack(item, counted=False)
            return
        env = decode_payload(payload_of(fields), self._limit)
        if isinstance(env, Malformed):
            self.stats.malformed += 1
            await self._dead_letter_many([(item, env.reason, env.error)])
            return
        env.add_hop(self.group)
        stats = self.stats
        stats.in_flight += 1
        started = time.perf_counter()
        try:
            if self._pass_redis:
                await self._handler(env, self._user_redis)
            else:
                await self._handler(env)
        except Exception as exc:
            stats.in_flight -= 1
            stats.failed += 1
            stats.observe_handler(time.perf_counter() - started)
            await self._handler_failed(item, exc)
            return
        except BaseException:
            stats.in_flight -= 1
            raise
        stats.in_flight -= 1
        stats.observe_handler(time.perf_counter() - started)
        self._ack(item, counted=True)

    async def _handler_failed(self, item: _Item, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if item.deliveries >= self._max_deliveries:
            await self._dead_letter_many([(item, REASON_POISON, error)])
            return
        item.retry_delay = self._retry.delay(item.deliveries)
        self._log.warning(
            "handler_failed",
            source_stream=item.stream,
            entry_id=item.entry_id,
            deliveries=item.deliveries,
            retry_in=round(item.retry_delay, 3),
            error=error,
        )
        due = time.monotonic() + item.retry_delay
        heapq.heappush(self._retry_heap, (due, next(self._retry_seq), item))
        self._retry_event.set()

    async def _retry_loop(self) -> None:
        """Re-claim failed entries when their backoff expires (bumping the Redis counter)."""
        attempt = 0
        while True:
            if not self._retry_heap:
                self._retry_event.clear()
                await self._retry_event.wait()
                continue
            wait = self._retry_heap[0][0] - time.monotonic()
            if wait > 0:
                self._retry_event.clear()
                with anyio.move_on_after(wait):
                    await self._retry_event.wait()
                continue
            due: list[_Item] = []
            while self._retry_heap and self._retry_heap[0][0] <= time.monotonic():
                due.append(heapq.heappop(self._retry_heap)[2])
                if len(due) >= self._count:
                    break
            try:
                await self._reclaim(due)
                attempt = 0
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "retry")
                attempt += 1
                later = time.monotonic() + RECONNECT_BACKOFF.delay(attempt)
                for item in due:
                    heapq.heappush(self._retry_heap, (later, next(self._retry_seq), item))

    async def _reclaim(self, due: list[_Item]) -> None:
        spec = [(i.stream, i.entry_id, max(0, int(i.retry_delay * 1000) - 5)) for i in due]
        results = await reclaim_for_retry(self._r, self.group, self.consumer, spec)
        for item, claimed in zip(due, results, strict=True):
            if not claimed.owned or self._stopping:
                self._local[item.stream].discard(item.entry_id)
                continue
            item.fields = claimed.fields
            item.deliveries = claimed.deliveries or item.deliveries + 1
            self._queue.put_nowait(item)

    # -- acks and dead letters ------------------------------------------------------
    def _ack(self, item: _Item, counted: bool) -> None:
        ids = self._acks.get(item.stream)
        if ids is None:
            self._acks[item.stream] = [item.entry_id]
        else:
            ids.append(item.entry_id)
        if counted:
            self._acks_counted += 1
        self._ack_event.set()

    async def _ack_loop(self) -> None:
        """Flush acks as they come: one pipelined XACK per stream per round trip."""
        attempt = 0
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            while self._acks:
                if await self._flush_acks():
                    attempt = 0
                    continue
                attempt += 1
                await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))

    async def _flush_acks(self) -> bool:
        batch, counted = self._acks, self._acks_counted
        self._acks, self._acks_counted = {}, 0
        try:
            # Shielded: a started flush completes even when the subscription stops.
            with anyio.CancelScope(shield=True), anyio.fail_after(SHIELDED_WRITE_TIMEOUT):
                async with self._r.pipeline(transaction=False) as pipe:
                    for stream, ids in batch.items():
                        pipe.xack(stream, self.group, *ids)
                    await pipe.execute()
        except BaseException as exc:
            for stream, ids in batch.items():
                self._acks.setdefault(stream, []).extend(ids)
            self._acks_counted += counted
            if isinstance(exc, TRANSIENT_ERRORS):
                self._watch.lost(exc, "ack")
                return False
            raise
        self._watch.restored()
        for stream, ids in batch.items():
            self._local[stream].difference_update(ids)
        self.stats.processed += counted
        return True

    async def _dead_letter_many(self, items: list[tuple[_Item, str, str]]) -> None:
        """XADD to the dead-letter stream and XACK, all in one MULTI/EXEC (shielded)."""
        written = False
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHIELDED_WRITE_TIMEOUT):
            try:
                await self._write_dead_letters(items)
                written = True
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "dead_letter")
        for item, reason, error in items:
            self._local[item.stream].discard(item.entry_id)
            if not written:
                continue
            self.stats.dead_lettered += 1
            self._log.warning(
                "dead_lettered",
                source_stream=item.stream,
                entry_id=item.entry_id,
                reason=reason,
                deliveries=item.deliveries,
                error=error,
                dlq_stream=self.dlq_stream,
            )
        if not written:
            # Still pending in Redis: the next own-pending check finds them again.
            self._check_requested = True

    async def _write_dead_letters(self, items: list[tuple[_Item, str, str]]) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            for item, reason, error in items:
                fields = dead_letter_fields(
                    data=payload_of(item.fields or {}),
                    reason=reason,
                    error=error,
                    deliveries=item.deliveries,
                    source_stream=item.stream,
                    source_id=item.entry_id,
                    group=self.group,
                    consumer=self.consumer,
                )
                queue_dead_letter(
                    pipe,
                    self.dlq_stream,
                    stream=item.stream,
                    group=self.group,
                    entry_id=item.entry_id,
                    fields=fields,
                )
            await pipe.execute()

    # -- shutdown -------------------------------------------------------------------
    async def _drain(self) -> None:
        """Drop queued entries (they stay pending); wait for running ones up to the timeout."""
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self._local[item.stream].discard(item.entry_id)
        with anyio.move_on_after(self._drain_timeout):
            while self._busy > 0:
                self._idle.clear()
                await self._idle.wait()
        if self._busy:
            self._log.warning("drain_timeout", unfinished=self._busy)

    async def _final_flush(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHIELDED_WRITE_TIMEOUT):
            attempt = 0
            try:
                while self._acks and not await self._flush_acks():
                    attempt += 1
                    await anyio.sleep(RECONNECT_BACKOFF.delay(attempt))
            except Exception as exc:
                self._log.warning("final_ack_flush_failed", error=repr(exc))
        if self._acks:
            self._log.warning("acks_not_flushed", entries=sum(map(len, self._acks.values())))


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def subscribe(
    redis: Any,
    stream: str | Sequence[str],
    handler: Handler,
    group: str = "corebus",
    consumer: str | None = None,
    *,
    concurrency: int = 16,
    count: int = 100,
    block_ms: int = 2000,
    max_deliveries: int = 5,
    retry_backoff: float = 0.5,
    retry_backoff_max: float = 30.0,
    dlq_stream: str | None = None,
    group_start_id: str = "0",
    pending_check_interval: float = 2.0,
    keys: StreamKeyBuilder | None = None,
) -> Subscription:
    """Start consuming ``stream`` (or several, read together) in the background.

    Returns at once with the :class:`Subscription` handle; ``await
    sub.started()`` to know the group exists. The handler is ``async def
    h(env)`` or ``async def h(env, redis)``; anything else raises
    :class:`TypeError` here. Entries are acked only after the handler returned;
    failures are retried with backoff until the Redis delivery counter reaches
    ``max_deliveries``, then dead-lettered (``dlq_stream``, default
    ``keys.dead_letter(group)``).
    """
    streams = [stream] if isinstance(stream, str | bytes) else list(stream)
    streams = [text(s) for s in streams]
    if not streams:
        raise ValueError("subscribe needs at least one stream")
    settings = get_settings()
    keys = keys or StreamKeyBuilder(settings.bus_namespace)
    sub = Subscription(
        redis,
        streams,
        handler,
        group=group,
        consumer=consumer or default_consumer_name(),
        concurrency=concurrency,
        count=count,
        block_ms=block_ms,
        max_deliveries=max_deliveries,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        dlq_stream=dlq_stream or keys.dead_letter(group),
        group_start_id=group_start_id,
        pending_check_interval=pending_check_interval,
        max_envelope_bytes=settings.bus_max_envelope_bytes,
    )
    sub._start()
    return sub


def active_subscriptions() -> list[Subscription]:
    """Subscriptions of this process that have not finished (also handle-less ones)."""
    return list(_LIVE)


async def stop_all(drain_timeout: float = 10.0) -> None:
    """Stop every running subscription of this process concurrently (worker shutdown)."""
    async with anyio.create_task_group() as tg:
        for sub in list(_LIVE):
            tg.start_soon(_stop_quietly, sub, drain_timeout)


async def _stop_quietly(sub: Subscription, drain_timeout: float) -> None:
    try:
        await sub.stop(drain_timeout)
    except Exception as exc:
        sub._log.debug("stop_error", error=repr(exc))
