"""One log line per distinct unexpected error of a retrying loop, not one per retry.

A loop that retries every second after an error it does not understand (a
MOVED from a misconfigured client, a script error) would otherwise write the
same line 3,600 times an hour. :class:`ErrorStreak` logs the first occurrence
of each distinct error text, counts the repeats, and logs once when the loop
succeeds again.
"""

from __future__ import annotations

from typing import Any


class ErrorStreak:
    """Remember the error a loop is failing with; log only when it changes."""

    def __init__(self, log: Any, event: str, **fields: Any) -> None:
        self._log = log
        self._event = event
        self._fields = fields
        self._last: str | None = None
        self.repeats = 0

    def failed(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text == self._last:
            self.repeats += 1
            return
        self._last, self.repeats = text, 0
        self._log.error(self._event, error=text, **self._fields)

    def succeeded(self) -> None:
        if self._last is None:
            return
        self._log.info(
            f"{self._event}_resolved", repeats=self.repeats, last_error=self._last, **self._fields
        )
        self._last, self.repeats = None, 0
