"""Consuming streams with a consumer group: at-least-once, batched, bounded, restartable.

One :class:`Subscription` owns one asyncio task that runs an anyio task group:
the reader, here (history first, then ``>`` in batches, decoded batch by batch,
plus own-pending checks), and the handler side in :mod:`core_bus.consume.runner`
(``concurrency`` workers, retries, dead letters) with the batched ack flusher of
:mod:`core_bus.consume.acks`. The Redis pending list is the source of truth: whatever this process
does not finish stays pending and is found again (after a restart, a reconnect,
or by a sibling through the supervisor's reclaim).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core_bus.consume.acks import AckBatcher
from core_bus.consume.deadletters import DeadLetterWriter
from core_bus.consume.handlers import Handler
from core_bus.consume.runner import HandlerRunner
from core_bus.consume.stats import SubscriptionStats
from core_bus.consume.workqueue import WorkQueue
from core_bus.envelope import hop_label
from core_bus.errors import BusError
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import get_settings
from core_bus.streams.backoff import Backoff
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.deadletter import REASON_POISON
from core_bus.streams.pending import (
    HeldEntry,
    entry_fields,
    fetch_entries,
    history_page,
    own_pending,
)
from core_bus.streams.replies import stream_pairs, text

#: Errors meaning "Redis is unreachable right now": back off and retry, never fail.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError (server loading its AOF)
    ReadOnlyError,  # talking to a demoted master during a failover
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
)
RECONNECT_BACKOFF = Backoff(base=0.05, cap=5.0)

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
        self._r = redis
        self._concurrency = concurrency
        self._count = count
        self._block_ms = _fit_block(redis, block_ms)
        self._max_deliveries = max_deliveries
        self._group_start_id = group_start_id
        self._check_interval = pending_check_interval
        self._limit = max_envelope_bytes
        self._log = get_logger(
            "core_bus.subscription", stream=",".join(streams), group=group, consumer=consumer
        )
        self._watch = ConnectionWatch(self._log, self.stats)
        self._reader = raw_reader(redis)
        # stream name as redis-py returns it (bytes or str) -> our str
        self._names: dict[Any, str] = {}
        for name in streams:
            self._names[name] = name
            self._names[name.encode()] = name
        self._read_spec = dict.fromkeys(streams, ">")
        # Entries we hold (queued, running, awaiting retry, ack or dead-letter).
        self._local: dict[str, set[str]] = {name: set() for name in streams}
        self._work = WorkQueue(low_water=count)
        # Held while our pending list is compared with ``_local`` and while acks or
        # dead letters remove entries from both, so a check never sees an entry
        # that is acked in Redis but still pending in its XPENDING reply.
        self._pel_lock = asyncio.Lock()
        self._acks = AckBatcher(
            self._pel_lock,
            self._r,
            group,
            self._local,
            self.stats,
            self._watch,
            TRANSIENT_ERRORS,
            RECONNECT_BACKOFF,
        )
        dead_letters = DeadLetterWriter(
            self._r,
            self._pel_lock,
            self._local,
            dlq_stream=dlq_stream,
            group=group,
            consumer=consumer,
            stats=self.stats,
            watch=self._watch,
            log=self._log,
            transient=TRANSIENT_ERRORS,
        )
        self._runner = HandlerRunner(
            self._r,
            handler,
            user_redis=redis,
            group=group,
            consumer=consumer,
            work=self._work,
            local=self._local,
            stats=self.stats,
            acks=self._acks,
            dead_letters=dead_letters,
            watch=self._watch,
            max_deliveries=max_deliveries,
            retry=Backoff(retry_backoff, retry_backoff_max),
            reconnect=RECONNECT_BACKOFF,
            transient=TRANSIENT_ERRORS,
            max_envelope_bytes=max_envelope_bytes,
            low_water=count,
            log=self._log,
            request_check=self._request_check,
        )
        self._dead_letter_many = self._runner.dead_letter_many
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
            self._runner.stop()
            if self._stop_scope is not None:
                self._stop_scope.cancel()
            self._work.space.set()
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
                    services.start_soon(self._acks.run)
                    services.start_soon(self._runner.retries.run)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self._concurrency):
                            workers.start_soon(self._runner.worker)
                        await self._read_loop()
                        await self._drain()
                        workers.cancel_scope.cancel()
                    services.cancel_scope.cancel()
            finally:
                await self._acks.final_flush(self._log)
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
                await self._guarded(self._connect)  # Redis lost its data: recreate the group
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
        """Backpressure: wait while more than ``count`` entries wait (interruptible)."""
        while self._work.needs_space() and not self._check_requested:
            with anyio.CancelScope() as scope:
                self._wait_scope = scope
                await self._work.wait_for_space()
            self._wait_scope = None

    async def _read_new(self, block_ms: int) -> None:
        reply: Any = None
        with anyio.CancelScope() as scope:
            self._wait_scope = scope
            if self._check_requested:
                scope.cancel()
            reply = await self._reader.xreadgroup(
                self.group, self.consumer, self._read_spec, count=self._count, block=block_ms
            )
        self._wait_scope = None
        if reply:
            self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        """Queue a fresh XREADGROUP ``>`` batch (delivery number 1 each).

        Every entry of the batch carries the same receive hop (one clock read per
        batch). Decoding stays with the worker, one entry at a time: an Envelope
        lives only while its handler runs, so the garbage collector's young
        generation stays small (decoding a whole batch up front kept ~100
        envelopes alive at once and made every collection promote them).
        """
        pairs: Any = reply
        if isinstance(reply, dict):  # RESP3
            pairs = stream_pairs(reply)
        append = self._work.items.append
        hop = self._hop()
        for raw_stream, entries in pairs:
            stream = self._names.get(raw_stream) or text(raw_stream)
            local = self._local[stream]
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if type(raw_id) is bytes else str(raw_id)
                if entry_id in local:
                    continue
                local.add(entry_id)
                if type(fields) is list:  # raw reply of our reader client: [name, value, ...]
                    if len(fields) == 2 and fields[0] == b"data":
                        fields = {b"data": fields[1]}
                    else:
                        fields = entry_fields(fields)
                append((stream, entry_id, fields or None, 1, hop))
        self._work.wake_one()

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
                async with self._pel_lock:
                    counts, entries = await history_page(
                        self._r, stream, self.group, self.consumer, after, self._count
                    )
                    fresh = self._claim_locally(stream, [entry_id for entry_id, _ in entries])
                if not entries:
                    break
                after = entries[-1][0]
                poison: list[tuple[HeldEntry, str, str]] = []
                for entry_id, fields in entries:
                    if entry_id not in fresh:
                        continue
                    before = counts.get(entry_id, 0)
                    if fields is not None and before >= self._max_deliveries:
                        msg = f"already delivered {before} times (limit {self._max_deliveries})"
                        item = HeldEntry(stream, entry_id, fields, before + 1)
                        poison.append((item, REASON_POISON, msg))
                    else:
                        self._work.put((stream, entry_id, fields, before + 1, self._hop()))
                        recovered += 1
                if poison:
                    await self._dead_letter_many(poison)
        if recovered:
            self._log.info("pending_recovered", entries=recovered)

    def _claim_locally(self, stream: str, entry_ids: list[str]) -> set[str]:
        """Mark entries as held by this process; return those we did not hold yet."""
        local = self._local[stream]
        fresh = {entry_id for entry_id in entry_ids if entry_id not in local}
        local.update(fresh)
        return fresh

    async def _check_own_pending(self) -> None:
        """Process own pending entries we do not hold (claimed to us by another client).

        Costs one pipelined XPENDING when there is nothing to do. Payloads come
        from XRANGE: the claim that gave us the entry already counted as a delivery.
        """
        wanted: list[tuple[str, str]] = []
        counts: dict[tuple[str, str], int] = {}
        async with self._pel_lock:
            pending = await own_pending(self._r, self.streams, self.group, self.consumer)
            for stream, rows in pending.items():
                fresh = self._claim_locally(stream, [entry_id for entry_id, _ in rows])
                for entry_id, delivered in rows:
                    if entry_id in fresh:
                        wanted.append((stream, entry_id))
                        counts[(stream, entry_id)] = delivered
        if not wanted:
            return
        try:
            fetched = await fetch_entries(self._r, wanted)
        except BaseException:
            for stream, entry_id in wanted:
                self._local[stream].discard(entry_id)
            raise
        poison: list[tuple[HeldEntry, str, str]] = []
        for stream, entry_id, fields in fetched:
            delivered = counts[(stream, entry_id)]
            if fields is not None and delivered > self._max_deliveries:
                msg = f"delivered {delivered} times (limit {self._max_deliveries})"
                poison.append((HeldEntry(stream, entry_id, fields, delivered), REASON_POISON, msg))
            else:
                self._work.put((stream, entry_id, fields, delivered, self._hop()))
        self._log.info("pending_claimed", entries=len(wanted))
        if poison:
            await self._dead_letter_many(poison)

    def _hop(self) -> str:
        """The receive hop ``env.add_hop(group)`` would append, for entries read now."""
        return hop_label(self.group)

    def _request_check(self) -> None:
        """Look at our own pending list before the next read (after a failed dead letter)."""
        self._check_requested = True

    # -- shutdown -------------------------------------------------------------------
    async def _drain(self) -> None:
        """Drop queued entries (they stay pending); wait for running ones up to the timeout."""
        for stream, entry_id, *_rest in self._work.clear():
            self._local[stream].discard(entry_id)
        await self._runner.drain(self._drain_timeout)


def raw_reader(redis: Any) -> Any:
    """A client for the hot XREADGROUP ``>`` whose reply skips redis-py's parsing.

    redis-py turns every entry's field list into a dict (and wraps RESP3 replies);
    :meth:`Subscription._dispatch` reads the server's reply as is instead. The
    client shares ``redis``'s connection pool (same server, credentials, protocol
    and decoding; closing ``redis`` closes it) and overrides one response callback
    on its own, never on the caller's client. Other client types are used as given.
    """
    if type(redis) is not AsyncRedis or redis.single_connection_client:
        return redis
    reader = AsyncRedis(connection_pool=redis.connection_pool)
    reader.set_response_callback("XREADGROUP", _as_is)
    return reader


def _as_is(response: Any, **_options: Any) -> Any:
    return response


def _fit_block(redis: Any, block_ms: int) -> int:
    """A blocking read must end before the client's socket timeout, or every idle
    read would look like a lost connection."""
    pool = getattr(redis, "connection_pool", None)
    timeout = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    if isinstance(timeout, int | float) and timeout > 0:
        return max(1, min(block_ms, int(timeout * 800)))
    return block_ms


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
