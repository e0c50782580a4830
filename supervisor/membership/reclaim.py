"""Cross-host reclaim: a dead member's pending entries go to live workers elsewhere.

For each member whose lease key is gone, every live supervisor looks at the
dead member's consumer registry (consumer -> agent). Per agent this supervisor
runs with ready workers it tries a TTL'd lock, ``supervisor_lock("reclaim:
<member>:<incarnation>:<agent>")`` (one lock per dead member *and agent*, so
several supervisors may each reclaim a different agent of one dead host; a
holder that dies simply lets the lock expire and the next scan takes over).
The winner moves each dead consumer's entries through the crash-reclaim path
(:meth:`~supervisor.delivery.rebalance.Rebalancer.reclaim_dead`: suspects,
poison, deletion only once empty) to its own ready workers and nudges them.
Registry names are forgotten by a script that refuses while the member's
lease exists again (it came back from a partition and re-records them).

Agents no live member runs keep their entries pending: the lowest-named live
member records ``pending_left`` in the dead member's record (status shows it)
and deletes the dead consumers that hold nothing. Once the registry is empty
the member's record is removed and a ``departed`` entry says what was
reclaimed, by whom.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.streams.replies import text
from supervisor.delivery.consumers import DELETE_HAS_PENDING, ConsumerDeleter, pending_summary
from supervisor.delivery.group_target import REASON_CRASH, REASON_EXIT
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.delivery.registry import ConsumerRegistry
from supervisor.membership.directory import REASON_EXPIRED, REASON_LEFT, MemberInfo
from supervisor.membership.lease import DEPARTED_MAXLEN
from supervisor.runtime.table import AgentRuntime, WorkerTable

log = get_logger("supervisor.membership")

#: Upper bound of one agent's reclaim; the lock is renewed meanwhile.
RECLAIM_DEADLINE = 30.0

# KEYS: registry, lease; ARGV: names -> how many were forgotten (0 while the lease exists)
_FORGET_IF_DEAD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HDEL', KEYS[1], unpack(ARGV))
"""
# KEYS: lock; ARGV: me, ttl_ms, mode ('renew' | 'release') -> 1 when the lock was ours
_LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'renew' then redis.call('PEXPIRE', KEYS[1], ARGV[2])
else redis.call('DEL', KEYS[1]) end
return 1
"""
# KEYS: members; ARGV: name, incarnation, field ('reclaimed' | 'pending_left'), json, by
# 'reclaimed' adds the counts (and ``by`` to reclaimed_by); 'pending_left' replaces them.
_NOTE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record.incarnation ~= ARGV[2] then return 0 end
local counts = cjson.decode(ARGV[4])
if ARGV[3] == 'pending_left' then
  record.pending_left = counts
else
  local sums = record.reclaimed
  if type(sums) ~= 'table' then sums = {} end
  for agent, n in pairs(counts) do sums[agent] = (tonumber(sums[agent]) or 0) + n end
  record.reclaimed = sums
  local by = record.reclaimed_by
  if type(by) ~= 'table' then by = {} end
  local seen = false
  for _, b in ipairs(by) do if b == ARGV[5] then seen = true end end
  if not seen then by[#by + 1] = ARGV[5] end
  record.reclaimed_by = by
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return 1
"""
# KEYS: members, departed, lease, registry; ARGV: name, incarnation, reason, note, maxlen
# Removes the record and writes the departed entry, once (1), when the member is still dead,
# still this incarnation and its registry is empty; else 0.
_FINISH = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HLEN', KEYS[4]) > 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record.incarnation ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local reclaimed = '{}'
if type(record.reclaimed) == 'table' and next(record.reclaimed) ~= nil then
  reclaimed = cjson.encode(record.reclaimed)
end
local by = ''
if type(record.reclaimed_by) == 'table' then by = table.concat(record.reclaimed_by, ',') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'name', ARGV[1],
  'incarnation', ARGV[2], 'reason', ARGV[3], 'at_ms', tostring(now), 'reclaimed_by', by,
  'reclaimed', reclaimed, 'pending_left', '{}', 'note', ARGV[4])
return 1
"""


class DeadMemberRegistry(ConsumerRegistry):
    """A dead member's registry; forgetting is refused once its lease exists again."""

    def __init__(self, redis: AsyncRedis, keys: StreamKeyBuilder, member: str) -> None:
        super().__init__(redis, keys, member)
        self._lease = keys.fleet_lease(member)
        self._forget = redis.register_script(_FORGET_IF_DEAD)

    async def forget(self, consumers: Iterable[str]) -> None:
        names = list(consumers)
        if names:
            await self._forget(keys=[self.key, self._lease], args=names)

    async def by_agent(self) -> dict[str, list[str]]:
        raw = await self._r.hgetall(self.key)
        out: dict[str, list[str]] = {}
        for name, agent in (raw or {}).items():
            out.setdefault(text(agent), []).append(text(name))
        return {agent: sorted(names) for agent, names in out.items()}


@dataclass
class ReclaimCounters:
    """What this supervisor reclaimed from dead members (for metrics)."""

    #: dead member name -> entries this supervisor reclaimed from it
    entries: dict[str, int] = field(default_factory=dict)
    #: dead member name -> consumers this supervisor deleted/forgot
    consumers: dict[str, int] = field(default_factory=dict)
    #: dead incarnations seen (member_expired events logged here)
    expired_seen: int = 0


class CrossHostReclaimer:
    """One scan per membership tick: reclaim what dead members held, then retire them."""

    def __init__(
        self,
        hooks: DeliveryHooks,
        table: WorkerTable,
        me: str,
        lock_ttl_ms: int,
        *,
        on_reclaimed: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self._hooks = hooks
        self._rebalancer = hooks.rebalancer
        self._r: AsyncRedis = hooks.rebalancer.redis
        self.keys: StreamKeyBuilder = hooks.rebalancer.keys
        self._table = table
        self.me = me
        self.lock_ttl_ms = lock_ttl_ms
        self.counters = ReclaimCounters()
        self._on_reclaimed = on_reclaimed
        self._lock = self._r.register_script(_LOCK)
        self._note = self._r.register_script(_NOTE)
        self._finish = self._r.register_script(_FINISH)
        self._deleter = ConsumerDeleter(self._r)
        self._seen: set[tuple[str, str]] = set()  # (member, incarnation) logged as expired
        self._counted: set[tuple[str, str]] = set()  # ordered consumers counted once
        self._pending_noted: dict[tuple[str, str], dict[str, int]] = {}

    async def scan(self, members: list[MemberInfo]) -> None:
        """Handle every dead member in ``members`` (one :func:`directory.members` read)."""
        live = [m for m in members if m.alive]
        if not any(m.name == self.me for m in live):
            return  # not a member right now (cut off, rejoining): act for nobody
        run_by_live = {agent for m in live for agent in m.agents}
        first_live = min(m.name for m in live)
        for member in members:
            if member.lease_incarnation is not None or member.name == self.me:
                continue
            try:
                await self._dead(member, run_by_live, first_live == self.me)
            except Exception as exc:  # next scan retries
                log.warning(
                    "member_reclaim_failed",
                    member=member.name,
                    error=f"{type(exc).__name__}: {exc}",
                )

    async def _dead(self, member: MemberInfo, run_by_live: set[str], steward: bool) -> None:
        key = (member.name, member.incarnation)
        if key not in self._seen:
            self._seen.add(key)
            self.counters.expired_seen += 1
            log.warning(
                "member_left_pending" if member.left else "member_expired",
                member=member.name,
                incarnation=member.incarnation,
                host=member.host,
                lease_ttl_ms=member.lease_ttl_ms,
            )
        registry = DeadMemberRegistry(self._r, self.keys, member.name)
        by_agent = await registry.by_agent()
        left: dict[str, int] = {}
        for agent, consumers in sorted(by_agent.items()):
            runtime = self._table.get(agent)
            if runtime is not None and runtime.config.uses_bus and runtime.live_consumers():
                await self._reclaim_agent(member, runtime, consumers, registry)
            elif agent not in run_by_live and steward:
                left[agent] = await self._unclaimable(member, agent, consumers, registry)
        if steward and self._pending_noted.get(key) != left:
            self._pending_noted[key] = left
            await self._note(
                keys=[self.keys.fleet_members()],
                args=[member.name, member.incarnation, "pending_left", _dumps(left), self.me],
            )
            if any(left.values()):
                log.warning(
                    "member_entries_unclaimable",
                    member=member.name,
                    pending_left=left,
                    why="no live supervisor runs these agents",
                )
        done = await self._finish(
            keys=[
                self.keys.fleet_members(),
                self.keys.fleet_departed(),
                self.keys.fleet_lease(member.name),
                registry.key,
            ],
            args=[
                member.name,
                member.incarnation,
                REASON_LEFT if member.left else REASON_EXPIRED,
                "reclaimed by live members",
                DEPARTED_MAXLEN,
            ],
        )
        if int(done):
            self._pending_noted.pop(key, None)
            log.info(
                "member_retired",
                member=member.name,
                incarnation=member.incarnation,
            )

    async def _reclaim_agent(
        self,
        member: MemberInfo,
        runtime: AgentRuntime,
        consumers: list[str],
        registry: DeadMemberRegistry,
    ) -> None:
        lock = self.keys.supervisor_lock(
            f"reclaim:{member.name}:{member.incarnation}:{runtime.name}"
        )
        if not await self._r.set(lock, self.me, nx=True, px=self.lock_ttl_ms):
            return  # another live supervisor is on it (or its lock has yet to expire)
        total = 0
        forgotten = 0
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lock, lock)
                with anyio.fail_after(RECLAIM_DEADLINE):
                    total, forgotten = await self._move(member, runtime, consumers, registry)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self._lock(keys=[lock], args=[self.me, self.lock_ttl_ms, "release"])
        if forgotten:
            c = self.counters.consumers
            c[member.name] = c.get(member.name, 0) + forgotten
        if total:
            self.counters.entries[member.name] = self.counters.entries.get(member.name, 0) + total
            await self._note(
                keys=[self.keys.fleet_members()],
                args=[
                    member.name,
                    member.incarnation,
                    "reclaimed",
                    _dumps({runtime.name: total}),
                    self.me,
                ],
            )
            if self._on_reclaimed is not None:
                self._on_reclaimed(member.name, runtime.name, total)
        log.info(
            "member_reclaimed",
            member=member.name,
            incarnation=member.incarnation,
            agent=runtime.name,
            entries=total,
            consumers=len(consumers),
            deleted=forgotten,
        )

    async def _move(
        self,
        member: MemberInfo,
        runtime: AgentRuntime,
        consumers: list[str],
        registry: DeadMemberRegistry,
    ) -> tuple[int, int]:
        target = await self._hooks.target(runtime)
        reason = REASON_EXIT if member.left else REASON_CRASH
        total = 0
        lease = self.keys.fleet_lease(member.name)
        for consumer in consumers:
            live = runtime.live_consumers()
            if not live or await self._r.exists(lease):
                break  # no receiver left, or the member came back: stop here
            moved = await self._rebalancer.reclaim_dead(
                target,
                consumer,
                live,
                reason=reason,
                registry=registry,
                release_leases=False,
            )
            self._hooks.nudge(runtime, moved)
            if target.ordered:  # evictions repeat until the new owner took the backlog
                if (member.name, consumer) not in self._counted and moved:
                    self._counted.add((member.name, consumer))
                    total += sum(moved.values())
            else:
                total += sum(moved.values())
        remaining = (await registry.by_agent()).get(runtime.name, [])
        return total, len([c for c in consumers if c not in remaining])

    async def _keep_lock(self, lock: str) -> None:
        interval = max(0.05, self.lock_ttl_ms / 3000)
        while True:
            await anyio.sleep(interval)
            await self._lock(keys=[lock], args=[self.me, self.lock_ttl_ms, "renew"])

    async def _unclaimable(
        self, member: MemberInfo, agent: str, consumers: list[str], registry: DeadMemberRegistry
    ) -> int:
        """Entries of an agent nobody alive runs: count them; delete dead consumers holding none."""
        group, streams = member.groups.get(agent, ("", ()))
        if not group or not streams:
            return 0
        pending: dict[str, int] = {}
        for stream in streams:
            for name, n in (await pending_summary(self._r, stream, group)).items():
                pending[name] = pending.get(name, 0) + n
        empty: list[str] = []
        for consumer in consumers:
            if pending.get(consumer, 0):
                continue
            results = [await self._deleter.delete_if_empty(s, group, consumer) for s in streams]
            if DELETE_HAS_PENDING not in results:
                empty.append(consumer)
        await registry.forget(empty)
        return sum(pending.get(c, 0) for c in consumers)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if value else "{}"


__all__ = ["RECLAIM_DEADLINE", "CrossHostReclaimer", "DeadMemberRegistry", "ReclaimCounters"]
