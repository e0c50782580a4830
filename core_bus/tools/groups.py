"""Who reads a stream: ``ag1-bus groups`` without a stream (every group of the
namespace, orphans marked), ``--destroy`` (remove a group no fleet reads any more),
and the warnings ``ag1-bus publish`` gives for a stream nobody will read."""

from __future__ import annotations

import json

from redis.asyncio import Redis as AsyncRedis

from core_bus.errors import BusError
from core_bus.keys import StreamKeyBuilder
from core_bus.settings import get_settings
from core_bus.streams.groups import UnknownStream, group_infos
from core_bus.streams.orphans import known_groups, namespace_groups


class GroupRefused(BusError):
    """The group may not be destroyed without --force (exit 1)."""


def _keys() -> StreamKeyBuilder:
    return StreamKeyBuilder(get_settings().bus_namespace)


async def namespace_table(redis: AsyncRedis, *, as_json: bool) -> str:
    """Every group on every stream of the namespace; ``ORPHAN`` where no fleet records it."""
    keys = _keys()
    groups, recorded = await namespace_groups(redis, keys)
    if as_json:
        return json.dumps(
            {
                "namespace": keys.ns,
                "recorded": recorded,
                "groups": [
                    {
                        "stream": g.stream,
                        "owner": g.owner,
                        "orphan": recorded and g.owner is None,
                        **g.info.to_dict(),
                    }
                    for g in groups
                ],
            }
        )
    if not groups:
        return f"no consumer groups in namespace {keys.ns}"
    rows = [("STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG", "READ BY")]
    for g in groups:
        owner = g.owner or ("ORPHAN" if recorded else "?")
        lag = "unknown" if g.info.lag is None else str(g.info.lag)
        rows.append(
            (g.stream, g.info.name, str(g.info.consumers), str(g.info.pending), lag, owner)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    orphaned = [g for g in groups if recorded and g.owner is None]
    if orphaned:
        first = orphaned[0]
        lines.append(
            f"{len(orphaned)} orphan group(s): no fleet reads them. Remove one with: "
            f"ag1-bus groups {first.stream} --destroy {first.info.name}"
        )
    elif not recorded:
        lines.append("(no supervisor has recorded its groups here: orphans cannot be told)")
    return "\n".join(lines)


async def destroy_group(redis: AsyncRedis, stream: str, group: str, *, force: bool) -> str:
    """XGROUP DESTROY, refused for a group a fleet reads or one with pending entries."""
    infos = {g.name: g for g in await group_infos(redis, stream, with_consumers=False)}
    info = infos.get(group)
    if info is None:
        raise GroupRefused(f"{stream} has no consumer group {group!r}")
    owner = (await known_groups(redis, _keys()) or {}).get(group)
    if not force and owner is not None:
        raise GroupRefused(
            f"group {group!r} is read by {owner}: remove the agent from its fleet.toml and "
            "reload first (or pass --force)"
        )
    if not force and info.pending:
        raise GroupRefused(
            f"group {group!r} on {stream} has {info.pending} pending entries that would be "
            "lost: pass --force to destroy it anyway"
        )
    await redis.xgroup_destroy(stream, group)
    return f"destroyed group {group} on {stream} ({info.pending} pending entries dropped)"


async def publish_warnings(redis: AsyncRedis, stream: str) -> list[str]:
    """Why an entry published to ``stream`` may never be read: outside the namespace,
    or no consumer group on it (the entry just sits there)."""
    namespace = get_settings().bus_namespace
    warnings = []
    if not stream.startswith(f"{namespace}:"):
        warnings.append(
            f"{stream} is outside the namespace {namespace!r} (agents read "
            f"{namespace}:agent:NAME:inbox; $BUS_NAMESPACE sets the namespace)"
        )
    try:
        infos = await group_infos(redis, stream, with_consumers=False)
    except UnknownStream:
        infos = []
    if not infos:
        warnings.append(
            f"no consumer group reads {stream}: nobody will process this entry "
            f"(ag1-bus groups lists the groups; is the agent running?)"
        )
    return warnings
