"""The consumer names one supervisor handed out, kept in Redis across its runs.

Start-up cleanup and crash reclaim act only on names found here, never on a
name pattern: a library user on the same host (whose default consumer name
starts with the host name too) or another supervisor's workers are never
touched. A name is recorded when its worker is spawned (before the worker can
have read anything: its interpreter takes far longer to start than one HSET)
and forgotten once its consumer is deleted from every stream of its group.
The key is :meth:`core_bus.keys.StreamKeyBuilder.supervisor_registry`; a hash
of consumer name -> agent name.
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.replies import text


class ConsumerRegistry:
    """Record, list and forget this supervisor's consumer names."""

    def __init__(self, redis: AsyncRedis, keys: StreamKeyBuilder, supervisor_name: str) -> None:
        self._r = redis
        self.key = keys.supervisor_registry(supervisor_name)

    async def record(self, consumer: str, agent: str) -> None:
        await self._r.hset(self.key, consumer, agent)

    async def forget(self, consumers: Iterable[str]) -> None:
        names = list(consumers)
        if names:
            await self._r.hdel(self.key, *names)

    async def names(self, agent: str) -> list[str]:
        """Every recorded consumer name of ``agent`` (oldest run's first is not promised)."""
        raw = await self._r.hgetall(self.key)
        return sorted(text(name) for name, owner in raw.items() if text(owner) == agent)
