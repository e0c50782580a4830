"""Redis Cluster awareness in one place: which client is a cluster, which keys share a slot.

A multi-key command, a Lua script or a MULTI/EXEC must touch keys of one hash
slot on a cluster (else CROSSSLOT). Callers group their keys with
:func:`by_slot` and take the atomic path only when :func:`one_slot` says so;
on a standalone or Sentinel-managed server every key is in "one slot".
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

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


async def _node_for(redis: Any, stream: str) -> Any:
    """The master serving ``stream``'s slot now (a slot the map lacks is transient)."""
    if redis._initialize:
        await redis.initialize()
    try:
        return redis.nodes_manager.get_node_from_slot(slot_of(stream))
    except SlotNotCoveredError as exc:  # mid-failover: back off and retry like a lost link
        raise RedisConnectionError(str(exc)) from exc


async def routed_xreadgroup(
    redis: Any, group: str, consumer: str, spec: dict[Any, Any], count: int, block: int | None
) -> Any:
    """XREADGROUP of streams in one slot, sent straight to that slot's master.

    redis-py's RedisCluster asks a node ``COMMAND GETKEYS`` before every command
    with movable keys (XREAD, XREADGROUP): a second round trip per read (2-3x the
    read's cost measured). The slot is known here, so the command goes to its node;
    a MOVED reply is still followed by redis-py, a lost node raises as usual.
    """
    args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
    if block is not None:
        args += ["BLOCK", block]
    args += ["STREAMS", *spec.keys(), *spec.values()]
    node = await _node_for(redis, next(iter(spec)))
    return await redis.execute_command(*args, target_nodes=node)


async def routed_xread(redis: Any, spec: dict[Any, Any], count: int, block: int | None) -> Any:
    """XREAD of streams in one slot, straight to that slot's master (as above)."""
    args: list[Any] = ["XREAD", "COUNT", count]
    if block is not None:
        args += ["BLOCK", block]
    args += ["STREAMS", *spec.keys(), *spec.values()]
    node = await _node_for(redis, next(iter(spec)))
    return await redis.execute_command(*args, target_nodes=node)


async def xread(redis: Any, spec: dict[Any, Any], count: int, block: int | None) -> Any:
    """XREAD of one slot's streams: routed on a cluster, the client's own call otherwise."""
    if is_cluster(redis):
        return await routed_xread(redis, spec, count, block)
    return await redis.xread(spec, count=count, block=block)


def keys_for(redis: Any, namespace: str) -> StreamKeyBuilder:
    """The key builder for a client: cluster names (hash tags) for a cluster client or
    when ``REDIS_MODE=cluster``, the prototype's names otherwise."""
    return StreamKeyBuilder(namespace, cluster=is_cluster(redis) or cluster_from_env())


async def read_slots(
    specs: Sequence[dict[Any, Any]],
    read: Callable[[dict[Any, Any], int], Awaitable[Any]],
    on_reply: Callable[[Any], None],
    block_ms: int,
    before_read: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """One read lane per slot (one XREAD/XREADGROUP per slot), for up to ``block_ms``.

    Each lane loops on its own: ``before_read()`` (may wait; False ends the lane),
    then a read blocking at most until the round's deadline, whose non-empty reply
    goes to ``on_reply``. A busy slot is read again at once while an idle one
    blocks; no lane cancels another (a cancelled read may already have delivered
    entries). An error of any lane ends the round and is raised as itself, not as
    an exception group, so callers' retry-on-transient-error handling applies.
    """
    deadline = time.monotonic() + block_ms / 1000
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def lane(spec: dict[Any, Any]) -> None:
            try:
                while before_read is None or await before_read():
                    remaining = int((deadline - time.monotonic()) * 1000)
                    if remaining < 1:
                        return
                    reply = await read(spec, remaining)
                    if reply:
                        on_reply(reply)
            except Exception as exc:
                errors.append(exc)
                group.cancel_scope.cancel()

        for spec in specs:
            group.start_soon(lane, spec)
    if errors:
        raise errors[0]
