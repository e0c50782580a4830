"""The handler side of a subscription: workers, acks of handled entries, retries, dead letters.

The reader (see :mod:`core_bus.consume.subscription`) fills a :class:`WorkQueue`;
``concurrency`` workers of one :class:`HandlerRunner` take entries from it, run
the handler and hand the ids to the :class:`AckBatcher` only after the handler
returned. A failed entry waits out its backoff in the :class:`RetryScheduler`
and is XCLAIMed again (so Redis counts the attempt); past ``max_deliveries``, or
when it cannot be decoded, it is dead-lettered and acked atomically.

Guards around the handler (see :mod:`core_bus.consume.isolation` for crash
suspects): ``handler_timeout`` cancels a handler at its deadline (a failed
attempt; dead-lettered as ``handler_timeout`` when attempts run out); a
handler still running ``handler_timeout_grace`` after that ignores
cancellation and is reported *stuck* (``stats.stuck``, ``on_stuck``) so the
supervisor replaces the worker. Before a handler starts on an entry, when the
leases were not renewed for ``claim_idle`` (a paused process), ownership is
re-checked first (:class:`~core_bus.consume.leases.LeaseKeeper`).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.acks import AckBatcher
from core_bus.consume.deadletters import DeadLetterWriter
from core_bus.consume.decode import decode_payload, payload_of
from core_bus.consume.handlers import Handler, handler_arity
from core_bus.consume.held import HeldEntries
from core_bus.consume.options import SubscriptionOptions
from core_bus.consume.retries import RetryScheduler
from core_bus.consume.stats import HANDLER_BUCKETS, SubscriptionStats
from core_bus.consume.workqueue import Work, WorkQueue
from core_bus.envelope import Envelope, hop_label
from core_bus.streams.backoff import Backoff
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.deadletter import REASON_POISON, REASON_TIMEOUT
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.pending import HeldEntry, reclaim_for_retry

# pydantic-core's validator, called directly on the hot path (what
# Envelope.from_json does, minus two Python frames per message).
_VALIDATE_JSON = Envelope.__pydantic_validator__.validate_json


class HandlerTimeout(Exception):
    """The handler ran past ``handler_timeout`` and was cancelled."""


class HandlerRunner:
    """Runs the handler for queued entries with a bound on concurrency."""

    def __init__(
        self,
        redis: AsyncRedis,
        handler: Handler,
        options: SubscriptionOptions,
        *,
        work: WorkQueue,
        held: HeldEntries,
        stats: SubscriptionStats,
        acks: AckBatcher,
        dead_letters: DeadLetterWriter,
        watch: ConnectionWatch,
        log: Any,
    ) -> None:
        self._r = redis
        self._handler = handler
        self._pass_redis = handler_arity(handler) == 2
        self._group = options.group
        self._consumer = options.consumer
        self._work = work
        self._held = held
        self._stats = stats
        self._acks = acks
        self.dead_letters = dead_letters
        self._max_deliveries = options.max_deliveries
        self._retry = Backoff(options.retry_backoff, options.retry_backoff_max)
        self._limit = options.max_envelope_bytes
        self._low_water = options.count
        self._concurrency = options.concurrency
        self._watch = watch
        self._log = log
        self.retries = RetryScheduler(self._reclaim, batch=options.count, watch=watch)
        self.stopping = False
        self._busy = 0  # entries in bookkeeping (failure handling, dead-lettering)
        self._idle = asyncio.Event()
        self.timeout = options.handler_timeout
        self.grace = options.handler_timeout_grace
        #: (stream, id) -> perf_counter start of every running handler
        self.running: dict[tuple[str, str], float] = {}
        #: running entries that turned out to be no longer ours: never acked
        self.lost: set[tuple[str, str]] = set()
        #: workers take no normal entries while a crash suspect runs alone
        self.isolating = False
        self.gate = asyncio.Event()
        self.gate.set()
        #: workers take no entries while paused (the supervisor is cut off)
        self.paused = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        #: set by the subscription: re-checks ownership when leases are stale
        self.leases: Any = None
        #: called with the number of stuck handlers whenever it changes
        self.on_stuck: Callable[[int], None] | None = None
        self._stuck_reported: set[tuple[str, str]] = set()

    def pause(self) -> None:
        """No queued entry starts until :meth:`resume` (running handlers finish)."""
        self.paused = True
        self._unpaused.clear()

    def resume(self) -> None:
        self.paused = False
        self._unpaused.set()

    def stop(self) -> None:
        """Workers take no new entries from now on (running handlers finish)."""
        self.stopping = True
        self._idle.set()

    async def drain(self, within: float) -> None:
        """Wait for running handlers and their bookkeeping, up to ``within`` seconds."""
        stats = self._stats
        with anyio.move_on_after(within):
            while self._busy or stats.in_flight:
                self._idle.clear()
                await self._idle.wait()
        if self._busy or stats.in_flight:
            self._log.warning("drain_timeout", unfinished=self._busy + stats.in_flight)

    async def worker(self) -> None:  # noqa: C901 - the hot path, flat on purpose
        """Run handlers for queued entries. The hot path: kept flat on purpose.

        A worker that takes an entry while more wait wakes one idle sibling, so
        slow handlers spread over ``concurrency`` workers while a fast handler
        drains a whole batch without task switches. Handler durations chain one
        clock read per entry: an entry's time runs from the end of the previous
        one (only queue bookkeeping and decoding lie in between, a few µs). The
        receive hop comes with the entry (one clock read per read batch).
        """
        work_queue, stats, acks = self._work, self._stats, self._acks
        queue = work_queue.items
        handler = self._call_handler()
        buckets = stats.handler_buckets
        perf, bisect_left = time.perf_counter, bisect.bisect_left
        space, low_water = work_queue.space, self._low_water
        validate, limit = _VALIDATE_JSON, self._limit
        running, lost, timeout = self.running, self.lost, self.timeout
        leases = self.leases
        claim_idle = leases.claim_idle if leases is not None and leases.enabled else 0.0
        fence = leases.fence if claim_idle else 0.0
        while True:
            if self.isolating:
                await self.gate.wait()
                continue
            if self.paused:
                await self._unpaused.wait()
                continue
            if not queue:
                await work_queue.wait_for_work()
                continue
            mark = perf()
            while queue:
                if self.isolating or self.paused:
                    break
                if claim_idle and (
                    mark - leases.renewed_at > claim_idle
                    or (fence and mark - leases.ticked_at > fence)
                ):
                    await self.revalidate()  # paused? drop what was claimed elsewhere first
                    mark = perf()
                    continue
                work = queue.popleft()
                # inlined WorkQueue.took_one (hot path)
                if queue and work_queue.waiters and not work_queue.woken:
                    work_queue.wake_one()  # one at a time: it runs only once we yield
                if work_queue.reader_waiting and len(queue) <= low_water:
                    space.set()
                stream, entry_id, fields, _deliveries, hop = work
                if self.stopping:
                    self._held.release(stream, entry_id)
                    continue
                env: Envelope | None = None
                raw = fields.get(b"data") if fields is not None else None
                if type(raw) is bytes and len(raw) <= limit:
                    try:
                        env = validate(raw)
                        env.trace.append(hop)
                    except Exception:  # anything odd: the slow path says why
                        env = None
                if env is None:
                    env = await self._slow_decode(work)
                    mark = perf()
                    if env is None:
                        continue
                key = (stream, entry_id)
                running[key] = mark
                stats.in_flight += 1
                failure: Exception | None = None
                try:
                    if timeout:
                        failure = await self._with_timeout(handler, env)
                    else:
                        await handler(env)
                except Exception as exc:
                    failure = exc
                finally:
                    del running[key]
                    now = perf()
                    elapsed, mark = now - mark, now
                    stats.in_flight -= 1
                    buckets[bisect_left(HANDLER_BUCKETS, elapsed)] += 1
                    stats.handler_seconds_sum += elapsed
                    if self.stopping or self.isolating:
                        self._idle.set()
                if lost and key in lost:
                    lost.discard(key)  # swept to a sibling meanwhile: not ours to ack
                    continue
                if failure is not None:
                    stats.failed += 1
                    await self._busy_with(self._handler_failed(HeldEntry(*work[:4]), failure))
                    mark = perf()
                    continue
                ids = acks.pending.get(stream)  # inlined AckBatcher.add (hot path)
                if ids is None:
                    acks.pending[stream] = [entry_id]
                    acks.event.set()
                else:
                    ids.append(entry_id)
                acks.counted += 1

    async def _with_timeout(
        self, handler: Callable[[Envelope], Awaitable[Any]], env: Envelope
    ) -> Exception | None:
        """Run ``handler`` under ``handler_timeout``; a HandlerTimeout when it was cancelled."""
        scope = asyncio.timeout(self.timeout)
        try:
            async with scope:
                await handler(env)
        except TimeoutError:
            if scope.expired():
                return HandlerTimeout(f"handler ran longer than {self.timeout:g}s (cancelled)")
            raise
        return None

    async def run_one(self, work: Work, before: Callable[[], Awaitable[None]]) -> bool:
        """Run one entry outside the hot loop (crash suspects); ``before`` runs just
        before the handler starts. False when it never reached a handler."""
        stream, entry_id, fields, _deliveries, hop = work
        env: Envelope | None = None
        raw = fields.get(b"data") if fields is not None else None
        if type(raw) is bytes and len(raw) <= self._limit:
            try:
                env = _VALIDATE_JSON(raw)
                env.trace.append(hop)
            except Exception:
                env = None
        if env is None:
            env = await self._slow_decode(work)
            if env is None:
                return False
        await before()
        key = (stream, entry_id)
        started = time.perf_counter()
        self.running[key] = started
        self._stats.in_flight += 1
        failure: Exception | None = None
        try:
            if self.timeout:
                failure = await self._with_timeout(self._call_handler(), env)
            else:
                await self._call_handler()(env)
        except Exception as exc:
            failure = exc
        finally:
            del self.running[key]
            self._stats.in_flight -= 1
            self._stats.observe_handler(time.perf_counter() - started)
            self._idle.set()
        if key in self.lost:
            self.lost.discard(key)
        elif failure is not None:
            self._stats.failed += 1
            await self._busy_with(self._handler_failed(HeldEntry(*work[:4]), failure))
        else:
            self._acks.add(stream, entry_id, True)
        return True

    async def wait_quiet(self) -> None:
        """Wait until no handler runs (the gate must be closed first)."""
        while self._stats.in_flight and not self.stopping:
            self._idle.clear()
            await self._idle.wait()

    async def revalidate(self) -> None:
        """Leases are stale (paused process): re-check ownership of everything held.

        While Redis does not answer, wait (with backoff) rather than run entries
        that may have been swept to a sibling meanwhile.
        """
        if self.leases is None:
            return
        if self.leases.fence and time.perf_counter() - self.leases.ticked_at > self.leases.fence:
            self.leases.invalidate()  # a pause the ticker has not seen yet
        try:
            await self.leases.renew()
        except TRANSIENT_ERRORS as exc:
            self._watch.lost(exc, "lease")
            await anyio.sleep(min(1.0, self.leases.claim_idle / 3))

    def stalled(self, now: float, after: float) -> bool:
        """Every handler slot busy with a handler older than ``after`` seconds."""
        running = self.running
        return len(running) >= self._concurrency and all(
            now - started > after for started in running.values()
        )

    def release_queued(self) -> int:
        """Out of our hands, still pending for us in Redis: the sweep can give them to a
        sibling (a stalled worker would only sit on them)."""
        queue = self._work.items
        for stream, entry_id, *_rest in queue:
            self._held.release(stream, entry_id)
        count = len(queue)
        queue.clear()
        return count

    def drop_lost(self, stream: str, entry_ids: Iterable[str]) -> None:
        """Entries no longer ours: out of our hands (queue, acks), never run or acked."""
        gone = set(entry_ids)
        self._held.release_many(stream, gone)
        queue = self._work.items
        kept = [w for w in queue if w[0] != stream or w[1] not in gone]
        if len(kept) != len(queue):
            queue.clear()
            queue.extend(kept)
        ids = self._acks.pending.get(stream)
        if ids:
            left = [i for i in ids if i not in gone]
            self._acks.counted -= len(ids) - len(left)
            if left:
                self._acks.pending[stream] = left
            else:  # an empty list would become an XACK without ids (an error reply)
                del self._acks.pending[stream]
        self.lost.update(k for k in self.running if k[0] == stream and k[1] in gone)

    async def watch_handlers(self) -> None:
        """Report handlers that ignored their cancellation for ``handler_timeout_grace``."""
        if not self.timeout:
            return
        limit = self.timeout + self.grace
        while True:
            await anyio.sleep(max(0.05, min(1.0, self.grace / 4, self.timeout / 4)))
            now = time.perf_counter()
            stuck = {key for key, start in self.running.items() if now - start > limit}
            if stuck == self._stuck_reported:
                continue
            for stream, entry_id in stuck - self._stuck_reported:
                self._log.error(
                    "handler_stuck",
                    source_stream=stream,
                    entry_id=entry_id,
                    seconds=round(now - self.running[(stream, entry_id)], 1),
                    handler_timeout=self.timeout,
                )
            self._stuck_reported = stuck
            self._stats.stuck = len(stuck)
            if self.on_stuck is not None:
                self.on_stuck(len(stuck))

    def _call_handler(self) -> Callable[[Envelope], Awaitable[Any]]:
        """The handler as a one-argument callable (``h(env)`` or ``h(env, redis)``)."""
        if not self._pass_redis:
            return self._handler
        handler, redis = self._handler, self._r
        return lambda env: handler(env, redis)

    async def _slow_decode(self, work: Work) -> Envelope | None:
        """Entries the fast path did not decode: deleted ones are acked, malformed ones
        dead-lettered (None: done with it); otherwise the Envelope with its receive hop."""
        stream, entry_id, fields, deliveries, hop = work
        if fields is None:  # deleted / trimmed while pending: nothing to process
            self._acks.add(stream, entry_id, False)
            return None
        env = decode_payload(payload_of(fields), self._limit)
        if isinstance(env, Envelope):
            env.trace.append(hop)
            return env
        self._stats.malformed += 1
        item = HeldEntry(stream, entry_id, fields, deliveries)
        await self._busy_with(self.dead_letters.write([(item, env.reason, env.error)]))
        return None

    async def _busy_with(self, step: Awaitable[object]) -> None:
        """Await bookkeeping for an entry; drain waits for it like for a handler."""
        self._busy += 1
        try:
            await step
        finally:
            self._busy -= 1
            if self.stopping:
                self._idle.set()

    async def _handler_failed(self, item: HeldEntry, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if item.deliveries >= self._max_deliveries:
            reason = REASON_TIMEOUT if isinstance(exc, HandlerTimeout) else REASON_POISON
            await self.dead_letters.write([(item, reason, error)])
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
        self.retries.schedule(item, item.retry_delay)

    async def _reclaim(self, due: list[HeldEntry]) -> None:
        """Retry time: XCLAIM the entries back (bumping the counter) and queue them."""
        spec = [(i.stream, i.entry_id, max(0, int(i.retry_delay * 1000) - 5)) for i in due]
        results = await reclaim_for_retry(self._r, self._group, self._consumer, spec)
        for item, claimed in zip(due, results, strict=True):
            if not claimed.owned or self.stopping:
                self._held.release(item.stream, item.entry_id)
                continue
            deliveries = claimed.deliveries or item.deliveries + 1
            hop = hop_label(self._group)
            self._work.put((item.stream, item.entry_id, claimed.fields, deliveries, hop))
