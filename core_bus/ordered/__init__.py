"""Ordered shard consumption: one live owner per shard stream, per-key order kept.

``subscription`` is the ownership round and the per-shard read loop,
``options`` the frozen settings, ``leases`` the Redis scripts (membership,
leases, fenced ack and dead-letter), ``claims`` the hand-over claims,
``entries`` one entry's handling to its end.
"""

from core_bus.ordered.claims import BACKLOG_PAGE, READ_COUNT
from core_bus.ordered.leases import ShardUnit, assigned, evict_consumer, members_key, shard_units
from core_bus.ordered.subscription import OrderedSubscription, subscribe_ordered

__all__ = [
    "BACKLOG_PAGE",
    "READ_COUNT",
    "OrderedSubscription",
    "ShardUnit",
    "assigned",
    "evict_consumer",
    "members_key",
    "shard_units",
    "subscribe_ordered",
]
