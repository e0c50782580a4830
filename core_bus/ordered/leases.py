"""Membership, assignment and leases of ordered shards, all kept in Redis.

* **Membership**: a sorted set of consumer names scored by expiry (Redis TIME);
  :func:`heartbeat` refreshes one member and drops expired ones.
* **Assignment**: :func:`assigned` deals the shards, in the fixed order of
  :func:`shard_units`, round-robin to the members sorted by name, so everyone
  computes the same owner.
* **Leases**: one key per shard holding its owner's name with a TTL
  (:func:`set_leases`: acquire / renew / release, only ever touching a lease
  that names the caller).
* **Fencing**: :func:`fenced_ack` and :func:`fenced_dead_letter` check the lease
  still names the caller in the same atomic step as the write.

Used by :mod:`core_bus.ordered.subscription` (the consume loop) and by the supervisor's
rebalancer (:func:`evict_consumer`). On Redis Cluster a shard's lease is in the
shard's slot (:meth:`~core_bus.keys.StreamKeyBuilder.shard_lease`), so the fenced
ack stays one script; leases of several slots are set one script per slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.deadletter import DLQ_MAXLEN
from core_bus.streams.dlqwrite import write_split_dead_letters
from core_bus.streams.replies import text
from core_bus.streams.slots import by_slot, is_cluster, one_slot

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + ttl, ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 3)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
# KEYS: leases; ARGV: me, ttl_ms, mode ('acquire' | 'renew' | 'release'); one 0/1 per key
_LEASES = """
local out = {}
for i, key in ipairs(KEYS) do
  local ok = 0
  if ARGV[3] == 'acquire' then
    if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then ok = 1
    elseif redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2]); ok = 1 end
  elseif redis.call('GET', key) == ARGV[1] then
    if ARGV[3] == 'renew' then redis.call('PEXPIRE', key, ARGV[2]) else redis.call('DEL', key) end
    ok = 1
  end
  out[i] = ok
end
return out
"""
# KEYS: lease, stream; ARGV: me, group, id -> XACK result, or -1 when the lease is not ours
_FENCED_ACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
"""
# KEYS: lease, stream, dlq; ARGV: me, group, id, maxlen, field, value, ...
_FENCED_DEAD_LETTER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
"""


def members_key(keys: StreamKeyBuilder, group: str) -> str:
    """Key of the ordered-consumer membership set of ``group`` (a TTL'd bookkeeping key)."""
    return keys.ordered_members(group)


@dataclass(frozen=True, slots=True)
class ShardUnit:
    """One shard stream and its lease key."""

    base: str
    index: int
    stream: str
    lease: str


def shard_units(
    keys: StreamKeyBuilder, group: str, base_streams: Sequence[str], shards: int
) -> list[ShardUnit]:
    """Every shard of every base stream, in the fixed order assignment deals them."""
    return [
        ShardUnit(base, i, keys.shard_stream(base, i), keys.shard_lease(group, base, i))
        for base in base_streams
        for i in range(shards)
    ]


def assigned(units: Sequence[ShardUnit], members: Sequence[str], me: str) -> set[ShardUnit]:
    """The shards ``me`` should own among ``members`` (deal ``k % len(members)``)."""
    ordered = sorted(set(members) | {me})
    mine = ordered.index(me)
    return {u for k, u in enumerate(units) if k % len(ordered) == mine}


async def heartbeat(redis: AsyncRedis, key: str, me: str, ttl_ms: int) -> list[Any]:
    """Refresh ``me`` in the membership set, drop expired members; the live members (raw)."""
    return list(await redis.eval(_HEARTBEAT, 1, key, me, ttl_ms))


async def set_leases(
    redis: AsyncRedis, units: Sequence[ShardUnit], me: str, ttl_ms: int, mode: str
) -> list[bool]:
    """Acquire, renew or release (``mode``) the leases of ``units``; True where it held."""
    held: dict[str, bool] = {}
    leases = [u.lease for u in units]
    for batch in by_slot(leases) if is_cluster(redis) else [leases]:  # one per cluster slot
        result = await redis.eval(_LEASES, len(batch), *batch, me, ttl_ms, mode)
        held.update((key, bool(int(x))) for key, x in zip(batch, result, strict=True))
    return [held[u.lease] for u in units]


async def evict_consumer(
    redis: AsyncRedis,
    keys: StreamKeyBuilder,
    group: str,
    base_streams: Sequence[str],
    shards: int,
    consumer: str,
) -> int:
    """Drop a dead consumer from membership and release the leases it holds.

    For the supervisor, right after the worker died: the shards move at the
    next tick of the survivors instead of after ``lease_ttl``. Returns how many
    leases were released (only those still naming ``consumer``).
    """
    units = shard_units(keys, group, base_streams, shards)
    await redis.zrem(members_key(keys, group), consumer)
    return sum(await set_leases(redis, units, consumer, 1, "release"))


async def fenced_ack(
    redis: AsyncRedis, unit: ShardUnit, me: str, group: str, entry_id: str
) -> bool:
    """XACK the entry if ``me`` still holds the shard's lease; False when it does not."""
    result = await redis.eval(_FENCED_ACK, 2, unit.lease, unit.stream, me, group, entry_id)
    return int(result) >= 0


async def fenced_dead_letter(
    redis: AsyncRedis,
    unit: ShardUnit,
    dlq_stream: str,
    me: str,
    group: str,
    entry_id: str,
    record: Mapping[str, Any],
) -> bool:
    """XADD ``record`` to ``dlq_stream`` and XACK the entry, if ``me`` still holds the lease."""
    if not one_slot(redis, unit.lease, unit.stream, dlq_stream):
        return await _split_fenced_dead_letter(redis, unit, dlq_stream, me, group, entry_id, record)
    flat: list[Any] = []
    for name, value in record.items():
        flat.extend((name, value))
    result = await redis.eval(
        _FENCED_DEAD_LETTER,
        3,
        unit.lease,
        unit.stream,
        dlq_stream,
        me,
        group,
        entry_id,
        DLQ_MAXLEN,
        *flat,
    )
    return int(result) >= 0


async def _split_fenced_dead_letter(
    redis: AsyncRedis,
    unit: ShardUnit,
    dlq_stream: str,
    me: str,
    group: str,
    entry_id: str,
    record: Mapping[str, Any],
) -> bool:
    """Redis Cluster, the dead-letter stream in another slot than the shard: check the
    lease, write the dead letter once (deduplicated by source stream and id), then the
    fenced ack. A lease lost in between leaves the entry to the shard's next owner, who
    finds the dead letter already written and only acks."""
    if text(await redis.get(unit.lease)) != me:
        return False
    await write_split_dead_letters(redis, dlq_stream, [(unit.stream, entry_id, record)], None)
    return await fenced_ack(redis, unit, me, group, entry_id)
