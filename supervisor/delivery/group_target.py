"""What the rebalancer works on and reports: one agent's group, its cumulative counters.

Kept apart from the policy (:mod:`supervisor.delivery.rebalance`, which re-exports
them) so code that only describes a group or reads counters needs no Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REASON_CRASH = "crash"
#: The worker exited 0 (a drain: rolling restart, scale down, stop): what it left is moved
#: the same way, but it did not crash.
REASON_EXIT = "exit"
REASON_IDLE = "idle"
REASON_STARTUP = "startup"


@dataclass(frozen=True)
class GroupTarget:
    """One agent's consumer group and the streams it reads."""

    agent: str
    group: str
    streams: tuple[str, ...]
    max_deliveries: int
    claim_idle: float  # seconds
    dlq_stream: str
    # Ordered shards (core_bus.ordered.subscription): entries must stay with the shard's lease
    # owner, so reclaim evicts the dead consumer's leases instead of claiming and
    # the sweep does not XAUTOCLAIM. ``base_streams`` are the unsharded names.
    ordered: bool = False
    base_streams: tuple[str, ...] = ()
    shards: int = 0
    #: crash suspects hash (core_bus.consume.suspects); "" = no isolation
    suspects_key: str = ""
    #: dead-letter stream length kept (None: default)
    dead_letter_maxlen: int | None = None


@dataclass
class RebalanceCounters:
    """Cumulative counts for one agent (metrics hooks)."""

    reclaimed_by_reason: dict[str, int] = field(
        default_factory=lambda: {
            REASON_CRASH: 0,
            REASON_EXIT: 0,
            REASON_IDLE: 0,
            REASON_STARTUP: 0,
        }
    )
    dead_lettered: int = 0
    crash_dead_lettered: int = 0  # subset: blamed for killing a worker (or a stuck handler)
    dlq_trimmed: int = 0
    deleted_consumers: int = 0
    deleted_entries: int = 0  # pending ids whose entry was trimmed/XDELed, now off the PEL

    def copy(self) -> RebalanceCounters:
        return RebalanceCounters(
            reclaimed_by_reason=dict(self.reclaimed_by_reason),
            dead_lettered=self.dead_lettered,
            crash_dead_lettered=self.crash_dead_lettered,
            dlq_trimmed=self.dlq_trimmed,
            deleted_consumers=self.deleted_consumers,
            deleted_entries=self.deleted_entries,
        )
