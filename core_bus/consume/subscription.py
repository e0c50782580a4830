"""Consuming streams with a consumer group: at-least-once, batched, bounded, restartable.

One :class:`Subscription` runs an anyio task group (see
:mod:`core_bus.consume.handle` for who owns it): the reader, here (history
first, then ``>`` in batches, plus own-pending checks), and the handler side
in :mod:`core_bus.consume.runner` (``concurrency`` workers, retries, dead
letters) with the batched ack flusher of :mod:`core_bus.consume.acks`. What
this process holds is :class:`~core_bus.consume.held.HeldEntries`'; the
settings are one frozen :class:`~core_bus.consume.options.SubscriptionOptions`.
The Redis pending list is the source of truth: whatever this process does not
finish stays pending and is found again (after a restart, a reconnect, or by a
sibling through the supervisor's reclaim).

A nudge (:meth:`Subscription.check_pending`, the worker's SIGUSR1) wakes a
blocked read with ``CLIENT UNBLOCK`` from another connection, so the reader
keeps its connection (cancelling the read would make redis-py drop it); only
when that is not possible is the read cancelled.

One job in one file (over ~400 lines on purpose): the reader's steps (history,
``>`` batches, own-pending checks, nudges, reconnects) share the read position,
the held set and the cancel scopes of one loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core_bus.consume.acks import AckBatcher
from core_bus.consume.deadletters import DeadLetterWriter
from core_bus.consume.handle import SubscriptionHandle, running_handles
from core_bus.consume.handlers import Handler
from core_bus.consume.held import HeldEntries
from core_bus.consume.isolation import Isolator
from core_bus.consume.leases import LeaseKeeper
from core_bus.consume.options import SubscriptionOptions
from core_bus.consume.runner import HandlerRunner
from core_bus.consume.stats import SubscriptionStats
from core_bus.consume.suspects import isolating_consumers
from core_bus.consume.workqueue import Work, WorkQueue
from core_bus.envelope import hop_label
from core_bus.keys import StreamKeyBuilder, default_consumer_name
from core_bus.log import get_logger
from core_bus.settings import get_settings
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.closewatch import watch_client
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.deadletter import REASON_POISON
from core_bus.streams.errors import TRANSIENT_ERRORS, is_nogroup
from core_bus.streams.groups import ensure_group
from core_bus.streams.pending import (
    HeldEntry,
    entry_fields,
    fetch_entries,
    history_page,
    own_pending,
)
from core_bus.streams.replies import stream_pairs, text
from core_bus.streams.slots import (
    is_cluster,
    keys_for,
    read_slots,
    routed_xreadgroup,
    slot_groups,
)

#: CLIENT UNBLOCK attempts before a nudge falls back to cancelling the read.
UNBLOCK_TRIES = 5

__all__ = [
    "RECONNECT_BACKOFF",
    "Subscription",
    "active_subscriptions",
    "default_consumer_name",
    "ensure_group",
    "stop_all",
    "subscribe",
]


class Subscription(SubscriptionHandle):
    """A consumer-group subscription to one or more streams (see :func:`subscribe`)."""

    def __init__(
        self, redis: AsyncRedis, streams: list[str], handler: Handler, options: SubscriptionOptions
    ) -> None:
        super().__init__()
        self.options = options
        self.consumer = options.consumer
        self.group = options.group
        self.streams = streams
        self.stats = SubscriptionStats()
        self.dlq_stream = options.dlq_stream
        self._r = redis
        self._block_ms = blocking_ms(redis, options.block_ms / 1000)
        self._log = get_logger(
            "core_bus.subscription",
            stream=",".join(streams),
            group=options.group,
            consumer=options.consumer,
        )
        self._watch = ConnectionWatch(self._log, self.stats)
        self._reader = raw_reader(redis)
        self._reader_id: int | None = None  # CLIENT ID of the reader's connection
        # stream name as redis-py returns it (bytes or str) -> our str
        self._names: dict[Any, str] = {}
        for name in streams:
            self._names[name] = name
            self._names[name.encode()] = name
        self._read_spec = dict.fromkeys(streams, ">")
        self._specs: list[dict[str, str]] = []
        self._specs_for: dict[str, str] | None = None
        self._cluster = is_cluster(redis)
        self.held = HeldEntries(streams)
        self._work = WorkQueue(low_water=options.count)
        self._acks = AckBatcher(self._r, options.group, self.held, self.stats, self._watch)
        self._acks.log = self._log
        dead_letters = DeadLetterWriter(
            self._r, self.held, options, stats=self.stats, watch=self._watch, log=self._log
        )
        self._runner = HandlerRunner(
            self._r,
            handler,
            options,
            work=self._work,
            held=self.held,
            stats=self.stats,
            acks=self._acks,
            dead_letters=dead_letters,
            watch=self._watch,
            log=self._log,
        )
        self._dead_letters = dead_letters
        self.isolator = Isolator(
            self._r,
            self._runner,
            key=options.suspects_key,
            consumer=options.consumer,
            held=self.held,
            stats=self.stats,
            watch=self._watch,
            log=self._log,
        )
        self.leases = LeaseKeeper(
            self._r,
            options.group,
            options.consumer,
            options.claim_idle,
            held_ids=self.held.snapshot,
            lost=self._drop_lost,
            before_renew=self._release_if_stalled,
            watch=self._watch,
            log=self._log,
            fence=options.ownership_fence,
            member_key=options.member_lease_key,
        )
        self._watch.on_lost = self.leases.invalidate
        self._runner.leases = self.leases
        self._resumed = anyio.Event()
        self._resumed.set()
        self._acks.before_flush = self._check_leases
        self._check_requested = False
        self._blocked_read = False  # the reader waits in XREADGROUP BLOCK right now
        self._nudge = anyio.Event()
        self._wait_scope: anyio.CancelScope | None = None
        self._stop_scope: anyio.CancelScope | None = None

    # -- public handle ------------------------------------------------------------
    def check_pending(self) -> None:
        """Look at our own pending list now (entries claimed to us by someone else).

        Non-blocking; sets a flag and wakes the reader (``CLIENT UNBLOCK`` of its
        blocked read, done by a helper task), so it is safe to call from a
        signal-driven task.
        """
        self._check_requested = True
        if self._wait_scope is not None and not self._blocked_read:
            self._wait_scope.cancel()  # waiting for queue space, not in Redis
        self._nudge.set()

    def pause(self) -> None:
        """Take no new entries (the supervisor is cut off from the fleet).

        Nothing is read and no queued entry starts; running handlers finish, and
        their acks go out only after an ownership re-check (what was reclaimed
        elsewhere meanwhile is dropped, never acked). Non-blocking."""
        if self.paused:
            return
        self.paused = True
        self._resumed = anyio.Event()
        self._runner.pause()
        self.leases.invalidate()
        held = sum(len(ids) for _stream, ids in self.held.snapshot())
        self._log.warning("subscription_paused", held=held)

    def resume(self) -> None:
        """Go on after :meth:`pause`: re-check ownership of everything held first
        (the next handler start or ack does), then read and look at our pending list."""
        if not self.paused:
            return
        self.paused = False
        self.leases.invalidate()
        self._runner.resume()
        self._resumed.set()
        self._log.info("subscription_resumed")
        self.check_pending()

    @property
    def paused(self) -> bool:
        return self._runner.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._runner.paused = value

    async def add_streams(self, streams: Sequence[str]) -> list[str]:
        """Read ``streams`` too from now on (the group is created on each first); returns
        those that were new. Wakes a blocked read so the next XREADGROUP includes them."""
        new = [s for s in dict.fromkeys(text(s) for s in streams) if s not in self._read_spec]
        for stream in new:
            await ensure_group(self._r, stream, self.group, self.options.group_start_id)
        new = [s for s in new if s not in self._read_spec]  # another call may have raced us
        for stream in new:
            self.held.track(stream)
            self._names[stream] = self._names[stream.encode()] = stream
        # New objects, not in-place updates: a read or pending check in flight keeps its own.
        self.streams = [*self.streams, *new]
        self._read_spec = {**self._read_spec, **dict.fromkeys(new, ">")}
        if new:
            self._nudge.set()  # re-read with them now (no pending check: nothing of ours there)
        return new

    @property
    def on_isolation(self) -> Any:
        """Called with ``"<stream> <id>"`` before a crash suspect runs alone, None after."""
        return self.isolator.on_isolation

    @on_isolation.setter
    def on_isolation(self, callback: Any) -> None:
        self.isolator.on_isolation = callback

    @property
    def on_stuck(self) -> Any:
        """Called with the number of handlers stuck past ``handler_timeout_grace``."""
        return self._runner.on_stuck

    @on_stuck.setter
    def on_stuck(self, callback: Any) -> None:
        self._runner.on_stuck = callback

    def _drop_lost(self, stream: str, entry_ids: list[str]) -> None:
        gone = set(entry_ids)
        self.stats.lost += len(gone)
        self._runner.drop_lost(stream, gone)
        self.isolator.drop(stream, gone)

    def stalled(self) -> bool:
        """Every handler slot busy longer than ``claim_idle`` (hung handlers)."""
        claim_idle = self.options.claim_idle
        return bool(claim_idle) and self._runner.stalled(time.perf_counter(), claim_idle)

    def _release_if_stalled(self) -> None:
        self.stats.stalled = int(self.stalled())
        if self.stats.stalled:
            released = self._runner.release_queued()
            if released:
                self._log.warning("stalled_queue_released", entries=released)

    async def _check_leases(self) -> None:
        """Before acks go out: after a pause, drop what is no longer ours first."""
        if self.leases.stale(time.perf_counter()):
            await self.leases.renew()

    def _request_stop(self) -> None:
        self._runner.stop()
        if self._stop_scope is not None:
            self._stop_scope.cancel()
        self._work.space.set()

    def _log_failure(self, error: BaseException) -> None:
        self._log.error("subscription_failed", error=repr(error), exc_info=error)

    # -- lifecycle ----------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            try:
                async with anyio.create_task_group() as services:
                    services.start_soon(self._acks.run)
                    services.start_soon(self._runner.retries.run)
                    services.start_soon(self._runner.dead_letters.run)
                    services.start_soon(self._waker)
                    services.start_soon(self.isolator.run)
                    services.start_soon(self._lease_loop)
                    services.start_soon(self.leases.watch_pauses)
                    services.start_soon(self._runner.watch_handlers)
                    async with anyio.create_task_group() as workers:
                        for _ in range(self.options.concurrency):
                            workers.start_soon(self._runner.worker)
                        await self._read_loop()
                        await self._drain()
                        workers.cancel_scope.cancel()
                    services.cancel_scope.cancel()
            finally:
                await self._acks.final_flush(self._log)
                self._runner.dead_letters.give_up()
                left = self.held.release_all()  # handlers cut off by the drain timeout
                if left:
                    self._log.info("left_pending", entries=left)
                with anyio.CancelScope(shield=True):
                    await self._close_reader()
        except anyio.get_cancelled_exc_class():
            self._log.info("subscription_cancelled")
            raise
        self._log.info("subscription_stopped", **self.stats.to_dict())

    async def _lease_loop(self) -> None:
        """Lease renewals; a group lost with Redis's data is recreated like the reader does."""
        while True:
            try:
                await self.leases.run()
                return
            except ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                self._log.warning("group_missing", error=str(exc))
                await self._guarded(self._connect)

    async def _close_reader(self) -> None:
        if self._reader is not self._r:
            try:
                await self._reader.aclose()
            except Exception as exc:  # the pool may already be closed by its owner
                self._log.debug("reader_close_failed", error=repr(exc))

    async def _read_loop(self) -> None:
        with anyio.CancelScope() as scope:
            self._stop_scope = scope
            if self._stopping:
                scope.cancel()
            await self._guarded(self._connect)
            self._mark_started()
            self._log.info("subscription_started", concurrency=self.options.concurrency)
            await self._guarded(self._recover_history)
            interval = self.options.pending_check_interval
            next_check = time.monotonic() + interval
            while True:
                if not self._resumed.is_set():
                    await self._resumed.wait()  # paused: read nothing
                if self._check_requested or time.monotonic() >= next_check:
                    self._check_requested = False
                    next_check = time.monotonic() + interval
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
                self._reader_id = None  # the reader reconnects: a new client id
                self._check_requested = True  # a lost reply may have delivered entries to us
            except ResponseError as exc:
                if not is_nogroup(exc):
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
            await ensure_group(self._r, stream, self.group, self.options.group_start_id)

    # -- waking the reader ----------------------------------------------------------
    async def _waker(self) -> None:
        """Turn nudges into ``CLIENT UNBLOCK`` of the reader's blocked XREADGROUP."""
        while True:
            await self._nudge.wait()
            self._nudge = anyio.Event()
            if not self._blocked_read:
                continue  # the flag alone is enough: the reader checks it before reading
            unblocked = await self._unblock_reader()
            if not unblocked and self._blocked_read and self._wait_scope is not None:
                self._wait_scope.cancel()  # costs the reader its connection

    async def _unblock_reader(self) -> bool:
        """CLIENT UNBLOCK the reader; a few quick tries while its read is still on the
        way to the server (it counts as blocked just before it is sent)."""
        for attempt in range(UNBLOCK_TRIES):
            if not self._blocked_read:
                return True
            if self._reader_id is None:
                return False
            try:
                if await self._r.client_unblock(self._reader_id):
                    return True
            except (ResponseError, *TRANSIENT_ERRORS):  # type: ignore[misc]
                return False  # ACL without CLIENT, or Redis away: fall back
            await anyio.sleep(0.002 * (attempt + 1))
        return False

    async def _reader_client_id(self) -> None:
        if self._reader_id is None and self._reader is not self._r:
            self._reader_id = int(await self._reader.client_id())

    # -- reading ------------------------------------------------------------------
    async def _wait_for_space(self) -> None:
        """Backpressure: wait while more than ``count`` entries wait (interruptible)."""
        while self._work.needs_space() and not self._check_requested:
            with anyio.CancelScope() as scope:
                self._wait_scope = scope
                await self._work.wait_for_space()
            self._wait_scope = None

    async def _read_new(self, block_ms: int) -> None:
        await self._reader_client_id()
        if self._check_requested:
            return  # the read loop looks at our pending list first
        specs = self._slot_specs()
        reply: Any = None
        with anyio.CancelScope() as scope:
            self._wait_scope = scope
            self._blocked_read = True
            try:
                if len(specs) == 1 and not self._cluster:
                    reply = await self._reader.xreadgroup(
                        self.group,
                        self.consumer,
                        specs[0],  # type: ignore[arg-type]
                        count=self.options.count,
                        block=block_ms,
                    )
                elif len(specs) == 1:
                    reply = await routed_xreadgroup(
                        self._reader,
                        self.group,
                        self.consumer,
                        specs[0],
                        self.options.count,
                        block_ms,
                    )
                else:
                    await self._read_slots(specs, block_ms)
            finally:
                self._blocked_read = False
        if scope.cancelled_caught:
            self._reader_id = None  # redis-py dropped the interrupted connection
        self._wait_scope = None
        if reply:
            self._dispatch(reply)

    def _slot_specs(self) -> list[dict[str, str]]:
        """One XREADGROUP spec per cluster slot (a single spec off a cluster)."""
        if self._specs_for is not self._read_spec:
            groups = slot_groups(self._reader, list(self._read_spec))
            self._specs = [dict.fromkeys(group, ">") for group in groups]
            self._specs_for = self._read_spec
        return self._specs

    async def _read_slots(self, specs: list[dict[str, str]], block_ms: int) -> None:
        """Redis Cluster, streams in several slots: one XREADGROUP lane per slot until
        the read loop's next pending check; a nudge cancels them all (the check that
        follows finds what a cancelled read delivered)."""

        async def read(spec: dict[Any, Any], block: int) -> Any:
            return await routed_xreadgroup(
                self._reader, self.group, self.consumer, spec, self.options.count, block
            )

        async def before_read() -> bool:
            while self._work.needs_space() and not self._check_requested:
                await self._work.wait_for_space()
            return not self._check_requested and not self._stopping

        await read_slots(specs, read, self._dispatch, block_ms, before_read)

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
        hold = self.held.hold
        hop = self._hop()
        for raw_stream, entries in pairs:
            stream = self._names.get(raw_stream) or text(raw_stream)
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if type(raw_id) is bytes else str(raw_id)
                if not hold(stream, entry_id):
                    continue
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
        limit = self.options.max_deliveries
        for stream in self.streams:
            after = "0"
            while True:
                await self._wait_for_space()
                async with self.held.lock:
                    counts, entries = await history_page(
                        self._r, stream, self.group, self.consumer, after, self.options.count
                    )
                    fresh = self.held.hold_new(stream, [entry_id for entry_id, _ in entries])
                if not entries:
                    break
                after = entries[-1][0]
                poison: list[tuple[HeldEntry, str, str]] = []
                for entry_id, fields in entries:
                    if entry_id not in fresh:
                        continue
                    before = counts.get(entry_id, 0)
                    if fields is not None and before >= limit:
                        msg = f"already delivered {before} times (limit {limit})"
                        item = HeldEntry(stream, entry_id, fields, before + 1)
                        poison.append((item, REASON_POISON, msg))
                    else:
                        self._work.put((stream, entry_id, fields, before + 1, self._hop()))
                        recovered += 1
                if poison:
                    await self._dead_letters.write(poison)
        if recovered:
            self._log.info("pending_recovered", entries=recovered)

    async def _check_own_pending(self) -> None:
        """Process own pending entries we do not hold (claimed to us by another client).

        Costs one pipelined XPENDING when there is nothing to do. Payloads come
        from XRANGE: the claim that gave us the entry already counted as a delivery.
        """
        if self.stalled():
            return  # leave them idle: the sweep gives them to a sibling that can run them
        wanted: list[tuple[str, str]] = []
        counts: dict[tuple[str, str], int] = {}
        async with self.held.lock:
            pending = await own_pending(self._r, self.streams, self.group, self.consumer)
            for stream, rows in pending.items():
                fresh = self.held.hold_new(stream, [entry_id for entry_id, _ in rows])
                for entry_id, delivered in rows:
                    if entry_id in fresh:
                        wanted.append((stream, entry_id))
                        counts[(stream, entry_id)] = delivered
        if not wanted:
            return
        try:
            fetched = await fetch_entries(self._r, wanted)
            marks: list[str | None] = [None] * len(wanted)
            if self.isolator.enabled:
                marks = await isolating_consumers(self._r, self.options.suspects_key, wanted)
        except BaseException:
            for stream, entry_id in wanted:
                self.held.release(stream, entry_id)
            raise
        poison: list[tuple[HeldEntry, str, str]] = []
        suspects: list[Work] = []
        limit = self.options.max_deliveries
        for (stream, entry_id, fields), mark in zip(fetched, marks, strict=True):
            delivered = counts[(stream, entry_id)]
            work = (stream, entry_id, fields, delivered, self._hop())
            if fields is not None and delivered > limit:
                msg = f"delivered {delivered} times (limit {limit})"
                poison.append((HeldEntry(stream, entry_id, fields, delivered), REASON_POISON, msg))
            elif mark is not None and fields is not None:
                suspects.append(work)  # was pending on a worker that died: run it alone
            else:
                self._work.put(work)
        self.isolator.add(suspects)
        self._log.info("pending_claimed", entries=len(wanted), suspects=len(suspects))
        if poison:
            await self._dead_letters.write(poison)

    def _hop(self) -> str:
        """The receive hop ``env.add_hop(group)`` would append, for entries read now."""
        return hop_label(self.group)

    # -- shutdown -------------------------------------------------------------------
    async def _drain(self) -> None:
        """Drop queued entries (they stay pending); wait for running ones up to the timeout."""
        for stream, entry_id, *_rest in self._work.clear():
            self.held.release(stream, entry_id)
        self.isolator.release_all()
        await self._runner.drain(self._drain_timeout)


def raw_reader(redis: AsyncRedis) -> AsyncRedis:
    """The reader's own client for the hot XREADGROUP ``>``: its reply skips redis-py's parsing.

    redis-py turns every entry's field list into a dict (and wraps RESP3 replies);
    :meth:`Subscription._dispatch` reads the server's reply as is instead. The
    client takes one connection of ``redis``'s pool for itself (same server,
    credentials, protocol and decoding; closing ``redis`` closes it), so its
    CLIENT ID is known and a nudge can unblock it; it overrides one response
    callback on its own, never on the caller's client. Other client types are
    used as given.
    """
    if type(redis) is not AsyncRedis or redis.single_connection_client:
        return redis
    reader = AsyncRedis(connection_pool=redis.connection_pool, single_connection_client=True)
    reader.set_response_callback("XREADGROUP", _as_is)
    return reader


def _as_is(response: Any, **_options: Any) -> Any:
    return response


def subscription(
    redis: AsyncRedis,
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
    handler_timeout: float = 0.0,
    handler_timeout_grace: float = 10.0,
    claim_idle: float = 0.0,
    isolate_suspects: bool = True,
    dead_letter_maxlen: int | None = None,
    ownership_fence: float = 0.0,
    member_lease_key: str = "",
) -> Subscription:
    """A :class:`Subscription` not started yet: ``async with`` it or ``await tg.start(sub.run)``.

    The handler is ``async def h(env)`` or ``async def h(env, redis)``; anything
    else raises :class:`TypeError` here. ``handler_timeout`` (seconds, 0 = none)
    cancels a handler at its deadline; ``claim_idle`` (seconds, 0 = off) is the
    idle threshold of whoever sweeps the group: held entries are re-leased every
    third of it. Crash suspects claimed to us are run alone unless
    ``isolate_suspects`` is False. ``ownership_fence`` (seconds, 0 = off): re-check
    ownership of held entries after a pause this long even below ``claim_idle``;
    ``member_lease_key``: the supervisor's membership lease, which must exist again
    before such a re-check (peers may be reclaiming while it is gone).
    """
    streams = [stream] if isinstance(stream, str | bytes) else list(stream)
    streams = [text(s) for s in streams]
    if not streams:
        raise ValueError("subscribe needs at least one stream")
    settings = get_settings()
    keys = keys or keys_for(redis, settings.bus_namespace)
    options = SubscriptionOptions(
        group=group,
        consumer=consumer or default_consumer_name(),
        dlq_stream=dlq_stream or keys.dead_letter(group),
        concurrency=concurrency,
        count=count,
        block_ms=block_ms,
        max_deliveries=max_deliveries,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        group_start_id=group_start_id,
        pending_check_interval=pending_check_interval,
        max_envelope_bytes=settings.bus_max_envelope_bytes,
        suspects_key=keys.suspects(group) if isolate_suspects else "",
        handler_timeout=handler_timeout,
        handler_timeout_grace=handler_timeout_grace,
        claim_idle=claim_idle,
        dead_letter_maxlen=dead_letter_maxlen,
        ownership_fence=ownership_fence,
        member_lease_key=member_lease_key,
    )
    return Subscription(redis, streams, handler, options)


async def subscribe(
    redis: AsyncRedis,
    stream: str | Sequence[str],
    handler: Handler,
    group: str = "corebus",
    consumer: str | None = None,
    **options: Any,
) -> Subscription:
    """Start consuming ``stream`` (or several, read together) in the background.

    Returns at once with the :class:`Subscription` handle (options as for
    :func:`subscription`); ``await sub.started()`` to know the group exists,
    ``await sub.wait()`` to run until it ends, ``await sub.stop()`` to drain.
    Entries are acked only after the handler returned; failures are retried
    with backoff until the Redis delivery counter reaches ``max_deliveries``,
    then dead-lettered (``dlq_stream``, default ``keys.dead_letter(group)``).
    """
    sub = subscription(redis, stream, handler, group, consumer, **options)
    watch_client(redis, sub)
    sub._start_background()
    return sub


def active_subscriptions() -> list[Subscription]:
    """Plain subscriptions of this event loop that have not finished (also handle-less ones)."""
    return [h for h in running_handles() if isinstance(h, Subscription)]


async def stop_all(drain_timeout: float = 10.0) -> None:
    """Stop every running subscription of this event loop concurrently (worker shutdown)."""
    async with anyio.create_task_group() as tg:
        for handle in running_handles():
            tg.start_soon(handle._stop_quietly, drain_timeout)
