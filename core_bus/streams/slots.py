"""Redis Cluster awareness in one place: which client is a cluster, which keys share a slot.

A multi-key command, a Lua script or a MULTI/EXEC must touch keys of one hash
slot on a cluster (else CROSSSLOT). Callers group their keys with
:func:`by_slot` and take the atomic path only when :func:`one_slot` says so;
on a standalone or Sentinel-managed server every key is in "one slot".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from core_bus.keys import StreamKeyBuilder, cluster_from_env

T = TypeVar("T")


def is_cluster(redis: Any) -> bool:
    """True for a ``redis.asyncio.cluster.RedisCluster`` client (or one of its pipelines)."""
    if isinstance(redis, RedisCluster):
        return True
    return isinstance(getattr(redis, "cluster_client", None), RedisCluster)


def slot_of(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (Redis' CRC16 of its hash tag or whole name)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def one_slot(redis: Any, *keys: str) -> bool:
    """Whether a multi-key operation on ``keys`` may be atomic on ``redis``."""
    if not is_cluster(redis):
        return True
    return len({slot_of(k) for k in keys}) <= 1


def by_slot(items: Iterable[T], key: Callable[[T], str] | None = None) -> list[list[T]]:
    """``items`` grouped by the slot of ``key(item)`` (default: the item), first-seen order."""
    groups: dict[int, list[T]] = {}
    for item in items:
        name: Any = item if key is None else key(item)
        groups.setdefault(slot_of(name), []).append(item)
    return list(groups.values())


def slot_groups(redis: Any, streams: Sequence[str]) -> list[list[str]]:
    """Streams one command may read together: all of them, or one list per cluster slot."""
    if not is_cluster(redis):
        return [list(streams)]
    return by_slot(streams)


def keys_for(redis: Any, namespace: str) -> StreamKeyBuilder:
    """The key builder for a client: cluster names (hash tags) for a cluster client or
    when ``REDIS_MODE=cluster``, the prototype's names otherwise."""
    return StreamKeyBuilder(namespace, cluster=is_cluster(redis) or cluster_from_env())


async def read_slots(
    specs: Sequence[dict[Any, Any]],
    read: Callable[[dict[Any, Any]], Awaitable[Any]],
    on_reply: Callable[[Any], None],
) -> None:
    """Blocked reads of several slots at once (one XREAD/XREADGROUP per slot).

    ``on_reply`` gets each non-empty reply as it arrives; the first one ends the
    other reads (their connections are dropped, the cluster client's pools replace
    them). An error of any read ends them all and is raised as itself, not as an
    exception group, so callers' retry-on-transient-error handling applies.
    """
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def one(spec: dict[Any, Any]) -> None:
            try:
                reply = await read(spec)
            except Exception as exc:
                errors.append(exc)
                group.cancel_scope.cancel()
                return
            if reply:
                on_reply(reply)
                group.cancel_scope.cancel()

        for spec in specs:
            group.start_soon(one, spec)
    if errors:
        raise errors[0]
