"""Capped exponential backoff with jitter, shared by handler retries and reconnects."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n)`` for attempt ``n >= 1``: ``base * 2**(n-1)`` capped at ``cap``.

    Jitter takes up to ``jitter`` (a fraction) off each delay so that many
    consumers failing together do not retry in lock step; the result never
    exceeds ``cap`` and never drops below ``(1 - jitter)`` of the raw delay.
    """

    base: float
    cap: float
    jitter: float = 0.5

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        exponent = min(max(attempt, 1) - 1, 60)
        raw = min(self.cap, self.base * (2.0**exponent))
        return max(0.0, raw * (1.0 - self.jitter * rand()))


#: Reconnect pacing of every reader and writer of a subscription: 50 ms doubling to 1 s
#: (a cap of 5 s added up to 4 s to the end of a Sentinel failover: bench/failover.py).
RECONNECT_BACKOFF = Backoff(base=0.05, cap=1.0)
