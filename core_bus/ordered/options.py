"""The settings of one ordered subscription, as one frozen value handed from layer to layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OrderedOptions:
    """What :func:`core_bus.ordered.subscribe_ordered` was asked for (validated once, here)."""

    group: str
    consumer: str
    dlq_stream: str
    shards: int
    lease_ttl: float = 10.0
    max_deliveries: int = 5
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    #: How often membership and leases are refreshed (default min(1 s, lease_ttl / 4)).
    tick: float | None = None
    max_envelope_bytes: int = 128 * 1024

    def __post_init__(self) -> None:
        if self.shards < 1 or self.max_deliveries < 1 or self.lease_ttl <= 0:
            raise ValueError("shards and max_deliveries must be >= 1, lease_ttl > 0")

    @property
    def round_interval(self) -> float:
        return self.tick if self.tick is not None else min(1.0, self.lease_ttl / 4)
