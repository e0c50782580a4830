"""Moves pending entries away from dead or hung consumers; dead-letters poison.

The supervisor knows every consumer name it handed out, so when a worker exits
it calls :meth:`Rebalancer.reclaim_dead` at once (crash-aware reclaim). A
periodic :meth:`Rebalancer.sweep` (XAUTOCLAIM cursor loop) catches hung
handlers and consumers of processes this supervisor does not know. At start,
:meth:`Rebalancer.cleanup_stale` reclaims and deletes consumers a previous
(SIGKILLed) run left behind: only names found in this supervisor's
:class:`~supervisor.delivery.registry.ConsumerRegistry`.

Delivery counting: a sweep's claim is a normal XCLAIM or XAUTOCLAIM, so it
bumps the Redis delivery counter once — a claim *is* the next delivery. A
crash reclaim does not know which entries the dead worker ran, so it claims
with JUSTID (no count) and marks them crash suspects, which receivers run
alone (:mod:`core_bus.consume.suspects`); only an entry the dead worker was
running alone (or reported stuck) is blamed: claimed with a count, and past
``max_deliveries`` dead-lettered as ``worker_crashed`` / ``handler_timeout``.
Receivers must therefore fetch claimed entries without bumping it again
(XPENDING + XRANGE, not XREADGROUP ``0``). An entry whose counter already
reached ``max_deliveries`` is not handed out again: it goes to the
dead-letter stream and is acked in one MULTI/EXEC.

One job in one file (over ~400 lines on purpose): reclaim, sweep and cleanup
share the round-robin offsets, sweep cursors, the consumers waiting to be
deleted and the counters; the stateless steps are in :mod:`supervisor.delivery.claims`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.suspects import isolating_consumers, queue_mark_suspects
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.ordered import assigned, evict_consumer, members_key, shard_units
from core_bus.streams.deadletter import REASON_CRASHED, REASON_POISON, REASON_TIMEOUT, TrimReport
from core_bus.streams.replies import Entry
from supervisor.delivery.claims import (
    ack_vanished_between,
    autoclaim,
    claim_to,
    claimed_entries,
    dead_letter_poison,
    fetch_or_ack,
)
from supervisor.delivery.consumers import (
    DELETE_DONE,
    DELETE_HAS_PENDING,
    ConsumerDeleter,
    GroupStats,
    PendingEntry,
    group_stats,
    pending_entries,
    pending_of_ids,
    pending_summary,
)
from supervisor.delivery.group_target import (
    REASON_CRASH,
    REASON_EXIT,
    REASON_IDLE,
    REASON_STARTUP,
    GroupTarget,
    RebalanceCounters,
)
from supervisor.delivery.registry import ConsumerRegistry

log = get_logger("supervisor.delivery.rebalance")

#: Entries per XPENDING/XCLAIM/XAUTOCLAIM batch.
BATCH = 200
#: Upper bound of batches per stream per call: a call never loops forever.
MAX_BATCHES = 1000


class Rebalancer:
    """Reclaim, sweep and cleanup for consumer groups; safe to share across agents.

    Several supervisors may run these against one Redis at once: claims from a
    dead consumer are fenced with XCLAIM's min-idle-time (an entry somebody else
    claimed meanwhile has a fresh idle time and is skipped), and consumers are
    deleted by a Lua script that re-checks the pending list in the same step.
    """

    def __init__(self, redis: AsyncRedis, keys: StreamKeyBuilder, supervisor_name: str) -> None:
        self.redis = redis
        self.keys = keys
        self.supervisor_name = supervisor_name
        self.registry = ConsumerRegistry(redis, keys, supervisor_name)
        self._deleter = ConsumerDeleter(redis)
        self._counters: dict[str, RebalanceCounters] = {}
        self._rr: dict[tuple[str, str], int] = {}  # (agent, group) -> round-robin offset
        self._cursors: dict[tuple[str, str], str] = {}  # (stream, group) -> resume cursor
        # consumers to delete once their pending list is empty: (agent, group) -> names
        self._graveyard: dict[tuple[str, str], set[str]] = {}
        self._trims: dict[str, TrimReport] = {}

    # -- counters ----------------------------------------------------------------
    def counters_for(self, agent: str) -> RebalanceCounters:
        """A copy of the agent's cumulative counters."""
        return self._counters.setdefault(agent, RebalanceCounters()).copy()

    def _c(self, agent: str) -> RebalanceCounters:
        return self._counters.setdefault(agent, RebalanceCounters())

    def _next_offset(self, target: GroupTarget, step: int) -> int:
        key = (target.agent, target.group)
        offset = self._rr.get(key, 0)
        self._rr[key] = offset + step
        return offset

    # -- crash-aware reclaim -------------------------------------------------------
    async def reclaim_dead(
        self,
        target: GroupTarget,
        dead_consumer: str,
        live_consumers: Sequence[str],
        *,
        reason: str = REASON_CRASH,
        exit_reason: str = "",
        registry: ConsumerRegistry | None = None,
        release_leases: bool = True,
    ) -> dict[str, int]:
        """Move ``dead_consumer``'s pending entries to ``live_consumers`` and delete it.

        Returns ``{receiver: entries claimed}``; the caller should nudge each
        receiver to look at its pending list. With no live consumer nothing is
        claimed; the dead consumer is still deleted where it owns nothing.

        ``registry``: where the consumer is forgotten once deleted (default this
        supervisor's; a cross-host reclaim passes the dead member's, and then a
        consumer that still owns entries is not kept for a later sweep: the
        caller retries it). ``release_leases`` False (cross-host): an ordered
        consumer only leaves the shard membership; its shard leases run out on
        their own TTL, which its worker fences itself against (a cut-off worker
        may still believe it owns a lease that was deleted under it).
        """
        live = [c for c in dict.fromkeys(live_consumers) if c != dead_consumer]
        moved: dict[str, int] = {}
        deleted_everywhere = True
        existed = False
        started = time.monotonic()
        if target.ordered:
            moved = await self._evict_ordered(target, dead_consumer, live, release_leases)
        for stream in target.streams:
            if live and not target.ordered:
                await self._reclaim_stream(
                    target, stream, dead_consumer, live, moved, exit_reason, reason != REASON_EXIT
                )
            with anyio.CancelScope(shield=True):
                result = await self._deleter.delete_if_empty(stream, target.group, dead_consumer)
            if result == DELETE_HAS_PENDING:
                deleted_everywhere = False
            existed = existed or result == DELETE_DONE
        total = sum(moved.values())
        counters = self._c(target.agent)
        counters.reclaimed_by_reason[reason] = counters.reclaimed_by_reason.get(reason, 0) + total
        if existed and deleted_everywhere:
            counters.deleted_consumers += 1
        if deleted_everywhere:
            with anyio.CancelScope(shield=True):
                await (registry or self.registry).forget([dead_consumer])
        elif registry is None:
            self._graveyard.setdefault((target.agent, target.group), set()).add(dead_consumer)
        if total or existed:
            log.info(
                "consumer_reclaimed",
                agent=target.agent,
                group=target.group,
                consumer=dead_consumer,
                reason=reason,
                claimed=total,
                receivers=len(moved),
                deleted=existed and deleted_everywhere,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
        return moved

    async def _evict_ordered(
        self, target: GroupTarget, dead: str, live: list[str], release: bool = True
    ) -> dict[str, int]:
        """Ordered shards: release the dead consumer's leases and membership at once.

        Its pending entries stay where they are; each shard's next owner claims
        them before reading anything new (that keeps per-key order). Returns the
        number of the dead consumer's pending entries per live consumer that the
        deterministic assignment will give them, so the caller can nudge them.
        """
        bases = target.base_streams or target.streams
        shards = max(1, target.shards)
        if release:
            await evict_consumer(self.redis, self.keys, target.group, bases, shards, dead)
        else:
            await self.redis.zrem(members_key(self.keys, target.group), dead)
        moved: dict[str, int] = {}
        if not live:
            return moved
        units = shard_units(self.keys, target.group, bases, shards)
        owner = {u.stream: c for c in live for u in assigned(units, live, c)}
        for stream in target.streams:
            receiver = owner.get(stream)
            n = (await pending_summary(self.redis, stream, target.group)).get(dead, 0)
            if n and receiver is not None:
                moved[receiver] = moved.get(receiver, 0) + n
        return moved

    async def _reclaim_stream(
        self,
        target: GroupTarget,
        stream: str,
        dead: str,
        live: list[str],
        moved: dict[str, int],
        exit_reason: str = "",
        suspect: bool = True,
    ) -> None:
        for _ in range(MAX_BATCHES):
            rows = await pending_entries(
                self.redis, stream, target.group, consumer=dead, count=BATCH
            )
            if not rows:
                return
            with anyio.CancelScope(shield=True):
                progressed = await self._reclaim_batch(
                    target, stream, dead, rows, live, moved, exit_reason, suspect
                )
            if not progressed:
                return  # everything left is owned elsewhere now or cannot move: stop
        log.warning("reclaim_batches_exhausted", agent=target.agent, stream=stream, consumer=dead)

    async def _reclaim_batch(
        self,
        target: GroupTarget,
        stream: str,
        dead: str,
        rows: list[PendingEntry],
        live: list[str],
        moved: dict[str, int],
        exit_reason: str = "",
        suspect: bool = True,
    ) -> bool:
        """One batch of a dead consumer's entries: dead-letter the blamed, move the rest.

        After a crash the moved entries are *suspects* (the receiver runs them
        alone); after a clean exit (``suspect`` False: a drained worker's
        read-ahead, never started) they are moved without a mark and run as usual.
        """
        limit = target.max_deliveries
        blamed = await self._blamed(target, stream, dead, rows)
        crashed = [r for r in rows if r.id in blamed and r.deliveries >= limit]
        # Without isolation an entry out of attempts is dead-lettered here; with it, an
        # unblamed one still gets its last attempt, run alone (its own failure names it).
        poison = [
            r
            for r in rows
            if r.id not in blamed and r.deliveries >= limit and not target.suspects_key
        ]
        done = {r.id for r in crashed} | {r.id for r in poison}
        movable = [r for r in rows if r.id not in done]
        for rows_of, why in (
            ([r for r in crashed if blamed[r.id] == REASON_CRASHED], REASON_CRASHED),
            ([r for r in crashed if blamed[r.id] == REASON_TIMEOUT], REASON_TIMEOUT),
        ):
            if rows_of:
                await self._dead_letter_rows(
                    target, stream, rows_of, consumer=dead, reason=why, exit_reason=exit_reason
                )
        if poison:
            await self._dead_letter_rows(target, stream, poison, consumer=dead)
        if not movable:
            return True
        before = sum(moved.values())
        # Fence: the dead consumer's entries only age; one claimed by someone else
        # since XPENDING has a fresh idle time and XCLAIM skips it.
        min_idle = max(0, min(r.idle_ms for r in movable) - 1)
        offset = self._next_offset(target, len(movable))
        counted: dict[str, list[str]] = {}  # blamed: this crash was their delivery
        free: dict[str, list[str]] = {}  # suspects: no delivery counted
        for i, row in enumerate(movable):
            plan = counted if row.id in blamed or not target.suspects_key else free
            plan.setdefault(live[(offset + i) % len(live)], []).append(row.id)
        if target.suspects_key and suspect:
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_mark_suspects(pipe, target.suspects_key, [(stream, r.id) for r in movable])
                await pipe.execute()
        missing = await self._claim_plan(target, stream, counted, min_idle, moved)
        missing += await self._claim_plan(target, stream, free, min_idle, moved, justid=True)
        settled = await self._settle_unclaimed(target, stream, dead, missing) if missing else 0
        return bool(poison or crashed) or settled > 0 or sum(moved.values()) > before

    async def _blamed(
        self, target: GroupTarget, stream: str, dead: str, rows: list[PendingEntry]
    ) -> dict[str, str]:
        """Ids ``dead`` was running alone when it died (or reported stuck) -> reason."""
        if not target.suspects_key or not rows:
            return {}
        marks = await isolating_consumers(
            self.redis, target.suspects_key, [(stream, r.id) for r in rows]
        )
        out: dict[str, str] = {}
        for row, mark in zip(rows, marks, strict=True):
            if mark == dead:
                out[row.id] = REASON_CRASHED
            elif mark == f"stuck:{dead}":
                out[row.id] = REASON_TIMEOUT
        return out

    async def _claim_plan(
        self,
        target: GroupTarget,
        stream: str,
        plan: dict[str, list[str]],
        min_idle_ms: int,
        moved: dict[str, int],
        *,
        justid: bool = False,
    ) -> list[str]:
        """XCLAIM ``plan`` (receiver -> ids), add what each got to ``moved``; return the
        ids no one got (deleted entries, or claimed by someone else meanwhile)."""
        if not plan:
            return []
        claimed = await claim_to(self.redis, stream, target.group, plan, min_idle_ms, justid=justid)
        missing: list[str] = []
        for receiver, got in claimed.items():
            if got:
                moved[receiver] = moved.get(receiver, 0) + len(got)
            missing.extend(i for i in plan[receiver] if i not in got)
        return missing

    async def _settle_unclaimed(
        self, target: GroupTarget, stream: str, dead: str, ids: list[str]
    ) -> int:
        """Ids XCLAIM did not return: deleted entries, or claimed by someone else meanwhile.

        A deleted entry can never be delivered again, so its id is acked wherever
        it is still pending (Redis 7 already dropped it from the list; 6.2 moved
        it to the receiver as a nil entry). Returns how many ids left the dead
        consumer's list (the caller stops when a batch makes no progress).
        """
        found, vanished = await fetch_or_ack(self.redis, stream, target.group, ids)
        self._c(target.agent).deleted_entries += len(vanished)
        alive = [i for i in ids if i in found]
        still = await pending_of_ids(self.redis, stream, target.group, alive)
        stuck = sum(1 for row in still.values() if row.consumer == dead)
        return len(ids) - stuck

    async def _dead_letter_rows(
        self,
        target: GroupTarget,
        stream: str,
        rows: list[PendingEntry],
        *,
        consumer: str,
        reason: str = REASON_POISON,
        exit_reason: str = "",
    ) -> None:
        ids = [row.id for row in rows]
        found, vanished = await fetch_or_ack(self.redis, stream, target.group, ids)
        self._c(target.agent).deleted_entries += len(vanished)
        entries = [(found[row.id], row.deliveries) for row in rows if row.id in found]
        await self._dead_letter(
            target, stream, entries, consumer=consumer, reason=reason, exit_reason=exit_reason
        )

    async def _dead_letter(
        self,
        target: GroupTarget,
        stream: str,
        entries: list[tuple[Entry, int]],
        *,
        consumer: str,
        reason: str = REASON_POISON,
        exit_reason: str = "",
    ) -> None:
        """XADD each to the dead-letter stream and XACK it, all in one MULTI/EXEC."""
        if not entries:
            return
        why = ""
        if reason == REASON_CRASHED:
            why = (
                f"worker {consumer} died ({exit_reason or 'exit unknown'}) while running this "
                "entry alone; {deliveries} attempts"
            )
        elif reason == REASON_TIMEOUT:
            why = (
                f"handler ignored its cancellation past handler_timeout + grace on {consumer}; "
                "{deliveries} attempts"
            )
        dropped = await dead_letter_poison(
            self.redis,
            target.dlq_stream,
            stream,
            target.group,
            entries,
            max_deliveries=target.max_deliveries,
            consumer=consumer,
            reason=reason,
            why=why,
            maxlen=target.dead_letter_maxlen,
        )
        counters = self._c(target.agent)
        counters.dead_lettered += len(entries)
        if reason != REASON_POISON:
            counters.crash_dead_lettered += len(entries)
        trims = self._trims.setdefault(target.agent, TrimReport(log, agent=target.agent))
        trims.add(target.dlq_stream, dropped, target.dead_letter_maxlen)
        counters.dlq_trimmed = trims.trimmed
        log.warning(
            "entries_dead_lettered",
            agent=target.agent,
            stream=stream,
            group=target.group,
            count=len(entries),
            reason=reason,
            dlq=target.dlq_stream,
        )

    # -- idle sweep ----------------------------------------------------------------
    async def sweep(self, target: GroupTarget, live_consumers: Sequence[str]) -> dict[str, int]:
        """XAUTOCLAIM entries idle longer than ``claim_idle`` to live consumers.

        Per stream a full cursor loop (bounded by ``MAX_BATCHES``; an unfinished
        scan resumes from its cursor on the next call), one receiver per batch in
        round-robin. Returns ``{receiver: entries claimed}``.
        """
        live = list(dict.fromkeys(live_consumers))
        moved: dict[str, int] = {}
        await self._bury(target)
        if not live or target.ordered:
            return moved
        for stream in target.streams:
            await self._sweep_stream(target, stream, live, moved)
        total = sum(moved.values())
        counters = self._c(target.agent)
        counters.reclaimed_by_reason[REASON_IDLE] += total
        if total:
            log.info(
                "idle_entries_claimed",
                agent=target.agent,
                group=target.group,
                claimed=total,
                receivers=len(moved),
            )
        return moved

    async def _bury(self, target: GroupTarget) -> None:
        """Delete consumers whose deletion had to wait for their pending list to empty."""
        waiting = self._graveyard.get((target.agent, target.group))
        if not waiting:
            return
        for name in list(waiting):
            results = [
                await self._deleter.delete_if_empty(stream, target.group, name)
                for stream in target.streams
            ]
            if DELETE_HAS_PENDING not in results:
                waiting.discard(name)
                await self.registry.forget([name])
                if DELETE_DONE in results:
                    self._c(target.agent).deleted_consumers += 1

    async def _sweep_stream(
        self, target: GroupTarget, stream: str, live: list[str], moved: dict[str, int]
    ) -> None:
        """One stream's sweep: a cursor loop that never hands an entry back to its holder.

        XAUTOCLAIM cannot exclude the consumer that holds an entry, and a hung
        handler's consumer is alive: claiming to it would only bump the delivery
        counter until healthy entries are dead-lettered. So each batch is peeked
        first (XPENDING IDLE from the cursor: the same entries XAUTOCLAIM would
        take, with their holders) and XAUTOCLAIMed to a live consumer holding
        none of them; when every live consumer holds some, the batch is moved
        entry by entry to another consumer (XCLAIM), and an entry whose holder
        is the only live consumer stays where it is.
        """
        min_idle_ms = max(0, int(target.claim_idle * 1000))
        cursor_key = (stream, target.group)
        cursor = self._cursors.pop(cursor_key, "0-0")
        for _ in range(MAX_BATCHES):
            idle = await pending_entries(
                self.redis,
                stream,
                target.group,
                start=cursor,
                count=BATCH,
                min_idle_ms=min_idle_ms,
            )
            if not idle:
                return
            holders = {row.consumer for row in idle}
            others = [c for c in live if c not in holders]
            with anyio.CancelScope(shield=True):
                if others:
                    receiver = others[self._next_offset(target, 1) % len(others)]
                    cursor = await self._autoclaim_batch(
                        target, stream, receiver, min_idle_ms, cursor, moved
                    )
                else:
                    await self._hand_over(target, stream, idle, live, min_idle_ms, moved)
                    cursor = "0-0" if len(idle) < BATCH else _after(idle[-1].id)
            if cursor == "0-0":
                return
        self._cursors[cursor_key] = cursor
        log.warning("sweep_batches_exhausted", agent=target.agent, stream=stream, cursor=cursor)

    async def _autoclaim_batch(
        self,
        target: GroupTarget,
        stream: str,
        receiver: str,
        min_idle_ms: int,
        cursor: str,
        moved: dict[str, int],
    ) -> str:
        """XAUTOCLAIM one batch to ``receiver``; returns the next cursor."""
        page = await autoclaim(
            self.redis, stream, target.group, receiver, min_idle_ms, cursor, BATCH
        )
        if page is None:
            return "0-0"
        if page.nils:
            # Redis 6.2 moved deleted entries to the receiver as id-less nils
            await ack_vanished_between(
                self.redis,
                stream,
                target.group,
                receiver,
                cursor,
                page.next_cursor,
                count=BATCH * 10,
            )
        await self._after_autoclaim(target, stream, receiver, page.claimed, moved)
        self._c(target.agent).deleted_entries += page.deleted + page.nils
        return page.next_cursor

    async def _hand_over(
        self,
        target: GroupTarget,
        stream: str,
        rows: list[PendingEntry],
        live: list[str],
        min_idle_ms: int,
        moved: dict[str, int],
    ) -> None:
        """XCLAIM each idle entry to a live consumer other than its holder.

        Entries whose next delivery would pass ``max_deliveries`` are
        dead-lettered instead; deleted entries are acked.
        """
        plan: dict[str, list[str]] = {}
        poison: dict[str, list[PendingEntry]] = {}
        offset = self._next_offset(target, len(rows))
        for i, row in enumerate(rows):
            if row.deliveries >= target.max_deliveries:
                poison.setdefault(row.consumer, []).append(row)
                continue
            choices = [c for c in live if c != row.consumer]
            if choices:
                plan.setdefault(choices[(offset + i) % len(choices)], []).append(row.id)
        for holder, dead_rows in poison.items():
            await self._dead_letter_rows(target, stream, dead_rows, consumer=holder)
        if not plan:
            return
        missing = await self._claim_plan(target, stream, plan, min_idle_ms, moved)
        if missing:
            _found, vanished = await fetch_or_ack(self.redis, stream, target.group, missing)
            self._c(target.agent).deleted_entries += len(vanished)

    async def _after_autoclaim(
        self,
        target: GroupTarget,
        stream: str,
        receiver: str,
        claimed: list[Entry],
        moved: dict[str, int],
    ) -> None:
        """Dead-letter claimed entries past ``max_deliveries``; count the rest as moved."""
        if not claimed:
            return
        rows = await pending_of_ids(self.redis, stream, target.group, [i for i, _ in claimed])
        poison: list[tuple[Entry, int]] = []
        kept = 0
        for entry in claimed:
            row = rows.get(entry[0])
            if row is None or row.consumer != receiver:
                continue  # acked or re-claimed by someone else meanwhile
            if row.deliveries > target.max_deliveries:
                poison.append((entry, row.deliveries))
            else:
                kept += 1
        await self._dead_letter(target, stream, poison, consumer=receiver)
        if kept:
            moved[receiver] = moved.get(receiver, 0) + kept

    # -- startup cleanup -------------------------------------------------------------
    async def cleanup_stale(
        self,
        target: GroupTarget,
        live_consumers: Sequence[str],
        *,
        receivers: Sequence[str] | None = None,
    ) -> dict[str, int]:
        """Reclaim and delete this supervisor's recorded consumers of the agent that are not live.

        For a previous run of this supervisor that was SIGKILLed: its workers'
        consumers still own pending entries nobody will ack. Only names in the
        registry are touched (never a library user's or another supervisor's).
        Entries go to ``receivers`` (default: every live consumer) - the
        daemon passes only ready workers, never one still starting.
        """
        live = set(live_consumers)
        stale = [name for name in await self.registry.names(target.agent) if name not in live]
        moved: dict[str, int] = {}
        to = list(live_consumers) if receivers is None else list(receivers)
        for name in stale:
            got = await self.reclaim_dead(target, name, to, reason=REASON_STARTUP)
            for receiver, n in got.items():
                moved[receiver] = moved.get(receiver, 0) + n
        if stale:
            log.info(
                "stale_consumers_cleaned",
                agent=target.agent,
                group=target.group,
                consumers=len(stale),
                claimed=sum(moved.values()),
            )
        return moved

    # -- metrics -----------------------------------------------------------------------
    async def group_stats(self, target: GroupTarget) -> list[GroupStats]:
        """Pending, lag (None when Redis reports it unknown) and consumers per stream."""
        return await group_stats(self.redis, list(target.streams), target.group)


__all__ = [
    "BATCH",
    "MAX_BATCHES",
    "REASON_CRASH",
    "REASON_IDLE",
    "REASON_STARTUP",
    "GroupStats",
    "GroupTarget",
    "RebalanceCounters",
    "Rebalancer",
    "claimed_entries",
]


def _after(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` (XAUTOCLAIM/XPENDING starts are inclusive)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
