"""``durability = "replicated"``: WAIT for replicas after the bus's writes.

Redis replicates asynchronously: an XADD or XACK the master answered can
vanish when a replica is promoted before it received it. With a
:class:`Replication` policy the bus follows publishes, acks and dead-letter
writes with ``WAIT numreplicas timeout`` (queued at the end of the same
pipeline when there is one, so it costs no extra round trip) and, on servers
that have it (Redis >= 7.2, Valkey) and run with AOF, ``WAITAOF 1 0 timeout``
(the master's own fsync). What that does and does not guarantee:
docs/DELIVERY.md. With no policy (the default) none of this code runs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from core_bus.errors import ReplicationTimeout


@dataclass(frozen=True, slots=True)
class Replication:
    """WAIT ``replicas`` replicas for at most ``timeout_ms`` after each write."""

    replicas: int = 1
    timeout_ms: int = 1000


def resolve_durability(durability: str | Replication | None) -> Replication | None:
    """A policy from ``"none"``/``"replicated"``/a :class:`Replication`; ``None`` means
    the environment's (``REDIS_DURABILITY``, ``REDIS_REPLICAS_TO_WAIT``, ``REDIS_WAIT_TIMEOUT``).

    :raises ValueError: for any other word.
    """
    if isinstance(durability, Replication):
        return durability
    from core_bus.settings import get_settings

    settings = get_settings()
    chosen = settings.redis_durability if durability is None else durability
    if chosen == "none":
        return None
    if chosen != "replicated":
        raise ValueError(f"durability must be 'none' or 'replicated', not {chosen!r}")
    return Replication(settings.redis_replicas_to_wait, settings.redis_wait_timeout)


# Whether a client's server takes WAITAOF with a local fsync (>= 7.2 or Valkey, AOF on);
# asked once per client: a failover to a differently configured master is not re-detected.
_waitaof: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


async def detect_waitaof(redis: Any) -> bool:
    """True when ``redis`` answers WAITAOF usefully (asked once per client)."""
    known = _waitaof.get(redis)
    if known is not None:
        return known
    info = await redis.info("server")
    version = str(info.get("redis_version", "0"))
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    supported = "valkey_version" in info or numbers >= (7, 2)
    if supported:
        persistence = await redis.info("persistence")
        supported = int(persistence.get("aof_enabled", 0)) == 1
    _waitaof[redis] = supported
    return supported


async def queue_wait(pipe: Any, redis: Any, policy: Replication) -> int:
    """Queue WAIT (and WAITAOF when useful) at the end of ``pipe``; the number queued.

    :raises ValueError: on a Redis Cluster client: WAIT has no key, so a cluster
        client cannot route it to the node that took the write (``check`` refuses
        this combination in fleet.toml).
    """
    from core_bus.streams.slots import is_cluster

    if is_cluster(redis) or is_cluster(pipe):
        raise ValueError(
            'durability "replicated" is not supported on Redis Cluster '
            "(WAIT cannot be routed to the node of the write); use Sentinel or none"
        )
    pipe.execute_command("WAIT", policy.replicas, policy.timeout_ms)
    if await detect_waitaof(redis):
        pipe.execute_command("WAITAOF", 1, 0, policy.timeout_ms)
        return 2
    return 1


def check_replies(replies: list[Any], policy: Replication, what: str) -> None:
    """Raise :class:`ReplicationTimeout` when the WAIT (``replies[0]``) or WAITAOF
    (``replies[1]``) replies fall short; an error reply is raised as is."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    acked = int(replies[0])
    if acked < policy.replicas:
        raise ReplicationTimeout(what, acked, policy.replicas, policy.timeout_ms)
    if len(replies) > 1:
        local = int(replies[1][0])
        if local < 1:
            raise ReplicationTimeout(f"{what} (AOF fsync)", 0, 1, policy.timeout_ms)


async def wait_replicated(redis: Any, policy: Replication, what: str) -> None:
    """WAIT (and WAITAOF) as their own round trip, after a write that could not carry them.

    :raises ReplicationTimeout: fewer replicas than ``policy.replicas`` confirmed.
    """
    pipe = redis.pipeline(transaction=False)
    await queue_wait(pipe, redis, policy)
    check_replies(await pipe.execute(raise_on_error=False), policy, what)
