"""AG1 core bus: Envelope messages on namespaced Redis Streams with at-least-once delivery."""

from core_bus.deadletter import DeadLetter
from core_bus.envelope import Envelope
from core_bus.errors import BusError, EnvelopeTooLarge, RpcTimeout
from core_bus.keys import StreamKeyBuilder, shard_for
from core_bus.publish import publish_envelope, publish_many
from core_bus.settings import BusSettings, build_redis_url, connect, get_settings, redact_url
from core_bus.stats import SubscriptionStats
from core_bus.subscription import Subscription, ensure_group, subscribe

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "BusSettings",
    "DeadLetter",
    "Envelope",
    "EnvelopeTooLarge",
    "RpcTimeout",
    "StreamKeyBuilder",
    "Subscription",
    "SubscriptionStats",
    "__version__",
    "build_redis_url",
    "connect",
    "ensure_group",
    "get_settings",
    "publish_envelope",
    "publish_many",
    "redact_url",
    "shard_for",
    "subscribe",
]
