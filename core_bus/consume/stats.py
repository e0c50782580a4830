"""Counters a subscription keeps; cheap to update per message, cheap to ship."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (seconds) of the handler-duration histogram buckets; +Inf is implied.
HANDLER_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass
class SubscriptionStats:
    """Cumulative counts since the subscription started (monotonic except in_flight)."""

    processed: int = 0  # handler returned and entry acked
    failed: int = 0  # handler raised (each attempt)
    dead_lettered: int = 0  # moved to the dead-letter stream (poison or malformed)
    malformed: int = 0  # subset of dead_lettered: could not be parsed
    in_flight: int = 0  # handlers running now
    reconnects: int = 0
    stuck: int = 0  # handlers that ignored cancellation past handler_timeout_grace (now)
    isolated: int = 0  # crash suspects run alone
    dlq_trimmed: int = 0  # old dead letters dropped by the dead_letter_maxlen trim
    stalled: int = 0  # 1 while every handler slot is busy longer than claim_idle (now)
    lost: int = 0  # held entries found swept to another consumer (after a pause)
    # Non-cumulative per-bucket counts; index len(HANDLER_BUCKETS) is +Inf.
    handler_buckets: list[int] = field(default_factory=lambda: [0] * (len(HANDLER_BUCKETS) + 1))
    handler_seconds_sum: float = 0.0

    def observe_handler(self, seconds: float) -> None:
        self.handler_buckets[bisect.bisect_left(HANDLER_BUCKETS, seconds)] += 1
        self.handler_seconds_sum += seconds

    def merge(self, other: SubscriptionStats) -> None:
        """Add another subscription's counts (used to total several subscriptions)."""
        self.processed += other.processed
        self.failed += other.failed
        self.dead_lettered += other.dead_lettered
        self.malformed += other.malformed
        self.in_flight += other.in_flight
        self.reconnects += other.reconnects
        self.stuck += other.stuck
        self.isolated += other.isolated
        self.dlq_trimmed += other.dlq_trimmed
        self.stalled += other.stalled
        self.lost += other.lost
        self.handler_seconds_sum += other.handler_seconds_sum
        for i, count in enumerate(other.handler_buckets):
            self.handler_buckets[i] += count

    def to_dict(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "malformed": self.malformed,
            "in_flight": self.in_flight,
            "reconnects": self.reconnects,
            "stuck": self.stuck,
            "isolated": self.isolated,
            "dlq_trimmed": self.dlq_trimmed,
            "stalled": self.stalled,
            "lost": self.lost,
            "hist": list(self.handler_buckets),
            "hist_sum": self.handler_seconds_sum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubscriptionStats:
        stats = cls()
        for name in (
            "processed",
            "failed",
            "dead_lettered",
            "malformed",
            "in_flight",
            "reconnects",
            "stuck",
            "isolated",
            "dlq_trimmed",
            "stalled",
            "lost",
        ):
            setattr(stats, name, int(data.get(name, 0)))
        hist = list(data.get("hist", []))
        if len(hist) == len(stats.handler_buckets):
            stats.handler_buckets = [int(c) for c in hist]
        stats.handler_seconds_sum = float(data.get("hist_sum", 0.0))
        return stats
