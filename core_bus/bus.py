"""The prototype's import surface (``from core_bus.bus import subscribe``), kept so
existing agents and the seed guide's examples run unmodified.

``subscribe`` returns a handle at once (``await sub.wait()`` to run until it
ends); ``subscribe_simple`` is the prototype's group-less follower and runs
until cancelled, as it did there.
"""

from core_bus.consume.subscription import Subscription, ensure_group, subscribe, subscription
from core_bus.follower import subscribe_simple
from core_bus.publish import publish_envelope, publish_many
from core_bus.settings import build_redis_url

__all__ = [
    "Subscription",
    "build_redis_url",
    "ensure_group",
    "publish_envelope",
    "publish_many",
    "subscribe",
    "subscribe_simple",
    "subscription",
]
