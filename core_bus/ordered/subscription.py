"""Ordered shard consumption: each shard stream is owned by one live consumer at a time.

Publishers route an entry to ``keys.route(base, routing_key, shards)`` (see
:func:`core_bus.keys.shard_for`), so every entry with one key lands on one
shard stream. Here each shard is handled by exactly one consumer at a time and
one entry at a time, which keeps per-key order; different shards run
concurrently.

Coordination lives in Redis, so it holds across hosts and supervisors (the
scripts are in :mod:`core_bus.ordered.leases`, the claim steps in
:mod:`core_bus.ordered.claims`, one entry's handling in :mod:`core_bus.ordered.entries`;
this module is the ownership round and the per-shard read loop):

* **Membership**: a sorted set of consumer names scored by expiry (Redis TIME),
  refreshed every tick; a member that stops heartbeating drops out after
  ``lease_ttl``.
* **Assignment**: the shards, in a fixed order, are dealt round-robin to the
  members sorted by name (``k % members``), so everyone computes the same owner
  and each gets ``ceil(shards / members)`` at most.
* **Leases**: ``keys.shard_lease(group, base, i)`` holds the owner's name with a
  TTL (``SET NX PX``, renewed every tick; ARCHITECTURE item 11). A consumer
  releases a shard it should no longer own only after its in-flight entry is
  done; a dead consumer's lease expires (or the supervisor evicts it at once
  with :func:`evict_consumer`).
* **Hand-over**: a new owner first XCLAIMs every pending entry of the shard
  (whoever holds it), handles them in id order, then reads new entries.
* **Fencing**: ack and dead-letter are Lua scripts that check the lease still
  names this consumer in the same atomic step; a consumer that lost its lease
  stops that shard at once.

Delivery counting matches :mod:`supervisor.delivery.rebalance`: the hand-over claim
counts as a delivery; a handler failure is retried in place (the entry blocks
its shard, as order requires) after an XCLAIM to ourselves bumps the counter;
at ``max_deliveries`` the entry is dead-lettered and acked atomically.
Requires a non-cluster Redis (scripts touch the lease and the stream together).

One job in one file (over ~400 lines on purpose): the ownership round and the
per-shard loop share the runner records and their local lease bound; apart, they
would hand the same state back and forth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.abc
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core_bus.consume.handle import SubscriptionHandle
from core_bus.consume.handlers import Handler
from core_bus.consume.stats import SubscriptionStats
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.ordered.claims import (
    READ_COUNT,
    ShardEntry,
    claim_backlog,
    own_pending,
)
from core_bus.ordered.entries import ShardEntryHandler
from core_bus.ordered.leases import (
    ShardUnit,
    assigned,
    heartbeat,
    members_key,
    set_leases,
    shard_units,
)
from core_bus.ordered.options import OrderedOptions
from core_bus.settings import get_settings
from core_bus.streams.backoff import RECONNECT_BACKOFF
from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.errors import TRANSIENT_ERRORS, is_nogroup, is_transient
from core_bus.streams.groups import ensure_group
from core_bus.streams.pending import entry_fields
from core_bus.streams.replies import streams_of, text
from core_bus.streams.slots import keys_for


@dataclass(eq=False)
class _Runner:
    """The task handling one owned shard."""

    unit: ShardUnit
    release: bool = False  # finish the in-flight entry, then give the shard up
    lost: bool = False  # lease gone: stop now, do not ack
    check_own: bool = True
    scope: anyio.CancelScope | None = None
    read_scope: anyio.CancelScope | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    # Local bound on the lease: (monotonic time the SET was sent) + ttl. Redis
    # expires the key no earlier, so while now < valid_until nobody else owns it.
    valid_until: float = 0.0
    renewed: anyio.Event = field(default_factory=anyio.Event)

    def confirm(self, valid_until: float) -> None:
        """A renewal succeeded: extend the local bound and wake a waiting shard task."""
        self.valid_until = valid_until
        event, self.renewed = self.renewed, anyio.Event()
        event.set()

    def stop_reading(self) -> None:
        if self.read_scope is not None:
            self.read_scope.cancel()


class OrderedSubscription(SubscriptionHandle):
    """Handle of a running ordered subscription (see :func:`subscribe_ordered`)."""

    def __init__(
        self,
        redis: AsyncRedis,
        base_streams: Sequence[str],
        handler: Handler,
        options: OrderedOptions,
        keys: StreamKeyBuilder,
    ) -> None:
        super().__init__()
        self.options = options
        self.redis = redis
        self.group = options.group
        self.consumer = options.consumer
        self.stats = SubscriptionStats()
        self.dlq_stream = options.dlq_stream
        self.units = shard_units(keys, options.group, base_streams, options.shards)
        self.streams = [u.stream for u in self.units]
        self._members_key = members_key(keys, options.group)
        self._ttl_ms = max(1, int(options.lease_ttl * 1000))
        self._ttl = options.lease_ttl
        # Start a handler only with at least this much of the lease left (see _fresh).
        self._lease_margin = options.lease_ttl / 4
        self._tick = options.round_interval
        # Blocking reads stay short (and far below the client's socket timeout)
        # whatever the ownership tick is.
        self._block_ms = max(1, int(min(self._tick, 1.0) * 1000))
        self._runners: dict[ShardUnit, _Runner] = {}
        self._log = get_logger("core_bus.ordered", group=self.group, consumer=self.consumer)
        self._watch = ConnectionWatch(self._log, self.stats)
        self._entries = ShardEntryHandler(redis, handler, options, stats=self.stats, log=self._log)
        self._wake = asyncio.Event()

    # -- public handle (see core_bus.consume.handle) --------------------------------
    def _request_stop(self) -> None:
        """Leave the membership, finish in-flight entries (up to the drain timeout), release."""
        self._wake.set()

    def _log_failure(self, error: BaseException) -> None:
        self._log.error("ordered_subscription_failed", error=repr(error))

    def check_pending(self) -> None:
        """Re-run the ownership round now and re-check own pending entries of owned shards."""
        for runner in self._runners.values():
            runner.check_own = True
        self._wake.set()

    def owned(self) -> list[str]:
        """Shard streams this consumer currently owns."""
        return [u.stream for u, r in self._runners.items() if not (r.lost or r.release)]

    # -- lifecycle -------------------------------------------------------------------
    async def _serve(self) -> None:
        await self._ensure_groups()
        async with anyio.create_task_group() as tg:
            await self._control(tg)

    async def _ensure_groups(self) -> None:
        """Create every shard's group, waiting for Redis like a plain subscription does."""
        attempt = 0
        while not self._stopping:
            try:
                for unit in self.units:
                    await ensure_group(self.redis, unit.stream, self.group)
                self._watch.restored()
                return
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "start")
                attempt += 1
                with anyio.move_on_after(RECONNECT_BACKOFF.delay(attempt)):
                    await self._wake.wait()

    async def _control(self, tg: anyio.abc.TaskGroup) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._round(tg)
                failures = 0
            except TRANSIENT_ERRORS as exc:
                failures += 1
                self._watch.lost(exc, "ownership_round")
                with anyio.move_on_after(RECONNECT_BACKOFF.delay(failures)):
                    await self._wake.wait()
                self._wake.clear()
                continue
            self._watch.restored()
            self._mark_started()
            with anyio.move_on_after(self._tick):
                await self._wake.wait()
            self._wake.clear()
        await self._shutdown()

    async def _round(self, tg: anyio.abc.TaskGroup) -> None:
        raw = await heartbeat(self.redis, self._members_key, self.consumer, self._ttl_ms)
        members = [text(m) for m in raw]
        want = assigned(self.units, members, self.consumer)
        for unit, runner in list(self._runners.items()):
            if runner.done.is_set():
                del self._runners[unit]
        held = [u for u, r in self._runners.items() if not r.lost]
        if held:
            sent = time.monotonic()
            renewed = await self._leases(held, "renew")
            for unit, ok in zip(held, renewed, strict=True):
                runner = self._runners[unit]
                if not ok:
                    self._lose(runner)
                    continue
                runner.confirm(sent + self._ttl)
                if unit not in want and not runner.release:
                    runner.release = True
                    runner.stop_reading()
        missing = [u for u in self.units if u in want and u not in self._runners]
        if missing:
            sent = time.monotonic()
            got = await self._leases(missing, "acquire")
            for unit, ok in zip(missing, got, strict=True):
                if ok:
                    runner = _Runner(unit, valid_until=sent + self._ttl)
                    self._runners[unit] = runner
                    tg.start_soon(self._run_shard, runner)

    def _lose(self, runner: _Runner) -> None:
        runner.lost = True
        self._log.warning("shard_lease_lost", stream=runner.unit.stream)
        if runner.scope is not None:
            runner.scope.cancel()

    async def _leases(self, units: Sequence[ShardUnit], mode: str) -> list[bool]:
        return await set_leases(self.redis, units, self.consumer, self._ttl_ms, mode)

    async def _shutdown(self) -> None:
        """Leave, let runners finish their in-flight entry (renewing leases meanwhile), release."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self.redis.zrem(self._members_key, self.consumer)
            for runner in self._runners.values():
                runner.release = True
                runner.stop_reading()
            deadline = time.monotonic() + self._drain_timeout
            while time.monotonic() < deadline:
                busy = [u for u, r in self._runners.items() if not (r.done.is_set() or r.lost)]
                if not busy:
                    break
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self._leases(busy, "renew")
                with anyio.move_on_after(min(self._tick, max(0.0, deadline - time.monotonic()))):
                    await self._wake.wait()
                self._wake.clear()
            for runner in list(self._runners.values()):
                if not runner.done.is_set() and runner.scope is not None:
                    runner.scope.cancel()
            for runner in list(self._runners.values()):
                await runner.done.wait()

    # -- one shard -------------------------------------------------------------------
    async def _run_shard(self, runner: _Runner) -> None:
        unit = runner.unit
        log = self._log.bind(stream=unit.stream)
        failures = 0
        try:
            with anyio.CancelScope() as scope:
                runner.scope = scope
                log.info("shard_acquired")
                recreate, backlog = False, True
                while not self._giving_up(runner):
                    try:
                        if recreate:  # stream or group deleted (Redis lost its data)
                            await ensure_group(self.redis, unit.stream, self.group)
                            log.warning("shard_group_recreated")
                            recreate = False
                        if backlog:  # hand-over: every pending entry of the shard is ours
                            await claim_backlog(self.redis, unit.stream, self.group, self.consumer)
                            backlog = False
                        await self._shard_step(runner)
                        failures = 0
                        self._watch.restored()
                    except TRANSIENT_ERRORS as exc:
                        failures += 1
                        self._watch.lost(exc, "shard")
                        await anyio.sleep(RECONNECT_BACKOFF.delay(failures))
                    except ResponseError as exc:
                        if is_transient(exc):
                            failures += 1
                            self._watch.lost(exc, "shard")
                            await anyio.sleep(RECONNECT_BACKOFF.delay(failures))
                        elif is_nogroup(exc):
                            recreate = True
                        elif not str(exc).startswith("UNBLOCKED"):
                            raise
        finally:
            with anyio.CancelScope(shield=True):
                if not runner.lost:
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await self._leases([unit], "release")
                runner.done.set()
                log.info("shard_released", lost=runner.lost)
            self._wake.set()

    async def _shard_step(self, runner: _Runner) -> None:
        batch: list[ShardEntry] = []
        if runner.check_own:
            batch = await own_pending(self.redis, runner.unit.stream, self.group, self.consumer)
            runner.check_own = bool(batch)
        if not batch:
            batch = await self._read_new(runner)
        for entry_id, fields, deliveries in batch:
            if self._giving_up(runner):
                runner.check_own = True
                return
            if not self._fresh(runner):
                # The lease may lapse before this handler ends (the ownership round
                # is late: loop stall, slow Redis). Handle nothing until it is
                # renewed; the rest of the batch stays in our pending list, in order.
                runner.check_own = True
                with anyio.move_on_after(self._tick):
                    await runner.renewed.wait()
                return
            if not await self._entries.handle(
                runner.unit, entry_id, fields, deliveries, lambda: self._giving_up(runner)
            ):
                self._lose(runner)
                return

    def _fresh(self, runner: _Runner) -> bool:
        """True while the lease surely outlives a handler started now (by the margin)."""
        return time.monotonic() < runner.valid_until - self._lease_margin

    def _giving_up(self, runner: _Runner) -> bool:
        """True once the shard is being handed over, was lost, or we are stopping."""
        return runner.release or runner.lost or self._stopping

    async def _read_new(self, runner: _Runner) -> list[ShardEntry]:
        with anyio.CancelScope() as scope:
            runner.read_scope = scope
            if runner.release or self._stopping:
                return []
            reply = await self.redis.xreadgroup(
                self.group,
                self.consumer,
                {runner.unit.stream: ">"},
                count=READ_COUNT,
                block=self._block_ms,
            )
            return [
                (entry_id, entry_fields(f), 1)
                for _stream, entries in streams_of(reply)
                for entry_id, f in entries
            ]
        # interrupted: a reply we never saw may have made entries ours; look next time
        runner.read_scope = None
        runner.check_own = True
        return []


async def subscribe_ordered(
    redis: AsyncRedis,
    base_streams: Sequence[str],
    shards: int,
    handler: Handler,
    group: str,
    consumer: str,
    *,
    lease_ttl: float = 10.0,
    max_deliveries: int = 5,
    dlq_stream: str | None = None,
    keys: StreamKeyBuilder | None = None,
    retry_backoff: float = 0.5,
    retry_backoff_max: float = 30.0,
    tick: float | None = None,
) -> OrderedSubscription:
    """Start consuming the ``shards`` shard streams of ``base_streams`` in key order.

    Returns at once; ``await sub.started()`` once the first ownership round
    ran. ``tick`` (default ``min(1 s, lease_ttl / 4)``) is how often membership
    and leases are refreshed and how quickly shards move when members change.
    The handler is ``async def h(env)`` or ``async def h(env, redis)``.
    """
    keys = keys or keys_for(redis, get_settings().bus_namespace)
    options = OrderedOptions(
        group=group,
        consumer=consumer,
        dlq_stream=dlq_stream or keys.dead_letter(group),
        shards=shards,
        lease_ttl=lease_ttl,
        max_deliveries=max_deliveries,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        tick=tick,
        max_envelope_bytes=get_settings().bus_max_envelope_bytes,
    )
    sub = OrderedSubscription(redis, [text(b) for b in base_streams], handler, options, keys)
    sub._start_background()
    return sub
