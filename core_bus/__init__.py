"""AG1 core bus: Envelope messages on namespaced Redis Streams with at-least-once delivery.

Public names are imported lazily (PEP 562), so ``import core_bus`` and the
``ag1-bus`` CLI start fast and a submodule is loaded only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "DeadLetter": "core_bus.streams.deadletter",
    "Envelope": "core_bus.envelope",
    "BusError": "core_bus.errors",
    "EnvelopeTooLarge": "core_bus.errors",
    "RpcTimeout": "core_bus.errors",
    "ReplicationTimeout": "core_bus.errors",
    "StreamKeyBuilder": "core_bus.keys",
    "shard_for": "core_bus.keys",
    "publish_envelope": "core_bus.publish",
    "publish_many": "core_bus.publish",
    "BusSettings": "core_bus.settings",
    "build_redis_url": "core_bus.settings",
    "connect": "core_bus.settings",
    "get_settings": "core_bus.settings",
    "redact_url": "core_bus.settings",
    "SubscriptionStats": "core_bus.consume.stats",
    "Subscription": "core_bus.consume.subscription",
    "ensure_group": "core_bus.streams.groups",
    "subscribe": "core_bus.consume.subscription",
    "subscription": "core_bus.consume.subscription",
    "FollowingSubscription": "core_bus.following",
    "following": "core_bus.following",
    "bus_rpc_call": "core_bus.rpc",
    "bus_rpc_envelope": "core_bus.rpc",
    "bus_rpc_stream": "core_bus.rpc",
    "rpc_reply": "core_bus.rpc",
    "rpc_request": "core_bus.rpc",
    "BusSubscriptions": "core_bus.discovery",
    "start_bus_subscriptions": "core_bus.discovery",
    "OrderedSubscription": "core_bus.ordered.subscription",
    "subscribe_ordered": "core_bus.ordered.subscription",
}

__all__ = [
    "BusError",
    "BusSettings",
    "BusSubscriptions",
    "DeadLetter",
    "Envelope",
    "EnvelopeTooLarge",
    "FollowingSubscription",
    "OrderedSubscription",
    "ReplicationTimeout",
    "RpcTimeout",
    "StreamKeyBuilder",
    "Subscription",
    "SubscriptionStats",
    "__version__",
    "build_redis_url",
    "bus_rpc_call",
    "bus_rpc_envelope",
    "bus_rpc_stream",
    "connect",
    "ensure_group",
    "following",
    "get_settings",
    "publish_envelope",
    "publish_many",
    "redact_url",
    "rpc_reply",
    "rpc_request",
    "shard_for",
    "start_bus_subscriptions",
    "subscribe",
    "subscribe_ordered",
    "subscription",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core_bus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from core_bus.consume.stats import SubscriptionStats
    from core_bus.consume.subscription import Subscription, ensure_group, subscribe, subscription
    from core_bus.discovery import BusSubscriptions, start_bus_subscriptions
    from core_bus.envelope import Envelope
    from core_bus.errors import BusError, EnvelopeTooLarge, ReplicationTimeout, RpcTimeout
    from core_bus.following import FollowingSubscription, following
    from core_bus.keys import StreamKeyBuilder, shard_for
    from core_bus.ordered.subscription import OrderedSubscription, subscribe_ordered
    from core_bus.publish import publish_envelope, publish_many
    from core_bus.rpc import bus_rpc_call, bus_rpc_envelope, bus_rpc_stream, rpc_reply, rpc_request
    from core_bus.settings import BusSettings, build_redis_url, connect, get_settings, redact_url
    from core_bus.streams.deadletter import DeadLetter
