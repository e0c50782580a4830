"""Connection state of one subscription, logged once per change (never per retry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core_bus.consume.stats import SubscriptionStats


class ConnectionWatch:
    """Tracks lost/restored so a flapping server yields two log lines, not a flood."""

    def __init__(self, log: Any, stats: SubscriptionStats) -> None:
        self._log = log
        self._stats = stats
        self.lost_since: bool = False
        #: Set when the owner closed the client on purpose (reported once elsewhere).
        self.silenced = False
        #: Called at every loss (not only the first): what we hold must be re-checked.
        self.on_lost: Callable[[], None] | None = None

    def lost(self, exc: BaseException, where: str) -> None:
        if self.on_lost is not None:
            self.on_lost()
        if not self.lost_since and not self.silenced:
            self.lost_since = True
            self._log.warning("connection_lost", where=where, error=f"{type(exc).__name__}: {exc}")

    def restored(self) -> None:
        if self.lost_since:
            self.lost_since = False
            self._stats.reconnects += 1
            self._log.info("connection_restored")
