"""The prototype's ``agent_bus_minimal`` import path, kept so existing agents run unmodified.

Its first-use guide does::

    from core_bus.agent_bus_minimal import start_bus_subscriptions
    from core_bus.keys import StreamKeyBuilder
    from core_bus.bus import build_redis_url, publish_envelope

``start_bus_subscriptions`` now returns a handle promptly instead of never
returning; see :mod:`core_bus.discovery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.handlers import Handler
from core_bus.consume.subscription import ensure_group, subscribe
from core_bus.discovery import BusSubscriptions, start_bus_subscriptions
from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import publish_envelope
from core_bus.settings import build_redis_url, connect

__all__ = [
    "BusSubscriptions",
    "Envelope",
    "StreamKeyBuilder",
    "build_redis_url",
    "discover_and_subscribe",
    "ensure_group",
    "get_patterns",
    "get_redis",
    "publish_envelope",
    "start_bus_subscriptions",
    "subscribe",
]


def get_patterns(agent_name: str) -> list[str]:
    """The prototype's helper: the stream patterns of an agent (its inbox)."""
    return [StreamKeyBuilder().agent_inbox(agent_name)]


async def get_redis() -> Any:
    """The prototype's helper: a client for ``build_redis_url()`` (caller closes it)."""
    return connect(build_redis_url())


async def discover_and_subscribe(
    redis: AsyncRedis,
    pattern: str | Sequence[str],
    group: str,
    handler: Handler,
    poll_delay: float = 5.0,
) -> BusSubscriptions:
    """The prototype's single-pattern entry point; same as :func:`start_bus_subscriptions`."""
    return await start_bus_subscriptions(redis, pattern, group, handler, poll_delay=poll_delay)
