"""The settings of one subscription, as one frozen value handed from layer to layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What :func:`core_bus.subscribe` was asked for (validated once, here)."""

    group: str
    consumer: str
    dlq_stream: str
    concurrency: int = 16
    count: int = 100
    block_ms: int = 2000
    max_deliveries: int = 5
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    group_start_id: str = "0"
    pending_check_interval: float = 2.0
    max_envelope_bytes: int = 128 * 1024
    #: Hash of crash suspects (see core_bus.consume.suspects); "" turns isolation off.
    suspects_key: str = ""
    #: Seconds a handler may run before it is cancelled (0: no limit).
    handler_timeout: float = 0.0
    #: Seconds a cancelled handler may take to return before it counts as stuck.
    handler_timeout_grace: float = 10.0
    #: The sweep's idle threshold: held entries are re-leased every third of it (0: never).
    claim_idle: float = 0.0
    #: Dead-letter stream length kept (approximately; None: the default 100,000; 0: untrimmed)
    dead_letter_maxlen: int | None = None
    #: Re-check ownership of held entries when they were not re-leased for this long
    #: even if claim_idle is longer (a supervisor's membership fence; 0: claim_idle only).
    ownership_fence: float = 0.0
    #: The supervisor's membership lease key: after a pause, ownership is re-checked only
    #: once it exists again ("": no supervisor membership).
    member_lease_key: str = ""

    def __post_init__(self) -> None:
        if min(self.concurrency, self.count, self.max_deliveries, self.block_ms) < 1:
            raise ValueError("concurrency, count, max_deliveries and block_ms must be >= 1")
        if min(self.handler_timeout, self.handler_timeout_grace, self.claim_idle) < 0:
            raise ValueError("handler_timeout, handler_timeout_grace and claim_idle must be >= 0")
        if self.pending_check_interval <= 0:
            raise ValueError("pending_check_interval must be > 0")
