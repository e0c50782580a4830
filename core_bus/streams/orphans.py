"""Consumer groups of a namespace, and which of them no fleet reads any more.

A removed agent's consumer group stays in Redis forever (and keeps its pending
entries): every supervisor records the groups of its plan in
:meth:`~core_bus.keys.StreamKeyBuilder.supervisor_groups`; a group of the
namespace that no supervisor records is an *orphan*. ``ag1-bus groups`` and
``ag1-fleet status`` list them; ``ag1-bus groups STREAM --destroy GROUP``
removes one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.groups import GroupInfo, UnknownStream, group_infos
from core_bus.streams.replies import text

#: SCAN page size; the namespace's streams are walked with a cursor, never KEYS.
SCAN_COUNT = 1000


@dataclass(frozen=True, slots=True)
class NamespaceGroup:
    stream: str
    info: GroupInfo
    owner: str | None  # "supervisor/agent" that records it, None = orphan


# KEYS: the hash; ARGV: field, value, ... -> the hash holds exactly those pairs.
_REPLACE_HASH = """
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
"""


async def known_groups(redis: AsyncRedis, keys: StreamKeyBuilder) -> dict[str, str] | None:
    """group -> ``supervisor/agent`` over every supervisor's record; ``None`` when no
    supervisor ever recorded its groups here (then nothing can be called an orphan)."""
    records: list[str] = []
    async for key in redis.scan_iter(match=keys.supervisor_groups_pattern(), count=SCAN_COUNT):
        records.append(text(key))
    if not records:
        return None
    prefix = keys.supervisor_groups_pattern()[:-1]
    out: dict[str, str] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for key in records:
            pipe.hgetall(key)
        replies = await pipe.execute()
    for key, mapping in zip(records, replies, strict=True):
        supervisor = key[len(prefix) :]
        for group, agent in (mapping or {}).items():
            out.setdefault(text(group), f"{supervisor}/{text(agent)}")
    return out


async def record_groups(
    redis: AsyncRedis, keys: StreamKeyBuilder, supervisor_name: str, groups: dict[str, str]
) -> None:
    """Replace this supervisor's record with ``groups`` (group -> agent), atomically."""
    key = keys.supervisor_groups(supervisor_name)
    flat: list[str] = []
    for group, agent in groups.items():
        flat += [group, agent]
    await redis.eval(_REPLACE_HASH, 1, key, *flat)  # a script: atomic on a cluster too


async def namespace_groups(
    redis: AsyncRedis, keys: StreamKeyBuilder, *, with_consumers: bool = False
) -> tuple[list[NamespaceGroup], bool]:
    """Every consumer group on every stream of the namespace, with its owner if recorded;
    and whether any supervisor recorded its groups at all (if not, none is an orphan)."""
    streams: list[str] = []
    async for key in redis.scan_iter(match=f"{keys.ns}:*", count=SCAN_COUNT, _type="stream"):
        streams.append(text(key))
    recorded = await known_groups(redis, keys)
    known = recorded or {}
    out: list[NamespaceGroup] = []
    for stream in sorted(streams):
        try:
            infos = await group_infos(redis, stream, with_consumers=with_consumers)
        except UnknownStream:  # deleted between SCAN and XINFO
            continue
        out.extend(NamespaceGroup(stream, info, known.get(info.name)) for info in infos)
    return out, recorded is not None


def orphans(groups: Iterable[NamespaceGroup]) -> list[NamespaceGroup]:
    return [g for g in groups if g.owner is None]
