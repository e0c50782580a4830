"""Child stdout/stderr -> structlog events, bounded.

The pipe is always drained as fast as the child writes (so a flooding child
never blocks on a full pipe), but only ``rate`` lines per second (with a
``burst``) are re-emitted; the rest are counted and reported as one
"output dropped" event. Lines longer than ``max_line`` bytes are truncated.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import anyio

from core_bus.log import get_logger

READ_SIZE = 64 * 1024
READS_PER_WAKE = 8
_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


#: The longest error line kept for ``/status`` (a failed start's reason).
LAST_ERROR_CHARS = 300


@dataclass
class CaptureStats:
    lines: int = 0
    dropped: int = 0
    truncated: int = 0
    # The child's last error line: an error-level structured event (``event: error``)
    # or a plain stderr line. A failed start's reason in /status (the import error
    # behind "exit 3" is otherwise only in the log). Reset at each spawn.
    last_error: str | None = None

    def saw_error(self, line: str) -> None:
        line = line.strip()
        if line:
            self.last_error = line[:LAST_ERROR_CHARS]


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LineCapture:
    """Reads one pipe of one child until EOF; shares a rate budget per child."""

    def __init__(
        self,
        fd: int,
        stream: str,
        bucket: TokenBucket,
        stats: CaptureStats,
        *,
        max_line: int = 8192,
        logger: Any = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.fd = fd
        self.stream = stream
        self.bucket = bucket
        self.stats = stats
        self.max_line = max_line
        self.log = logger if logger is not None else get_logger("supervisor.output")
        self.fields = dict(fields or {})
        self._partial = bytearray()
        self._partial_truncated = False
        self._pending_drops = 0
        self._last_drop_report = 0.0

    async def run(self) -> None:
        """Read until EOF (the child and all its group closed the pipe)."""
        try:
            while True:
                await anyio.wait_readable(self.fd)
                # At most READS_PER_WAKE reads, then back to the loop: a child that keeps
                # the pipe full must not starve the supervisor's other tasks.
                for _ in range(READS_PER_WAKE):
                    try:
                        chunk = os.read(self.fd, READ_SIZE)
                    except BlockingIOError:
                        break
                    except OSError:
                        chunk = b""
                    if not chunk:
                        self._flush_partial()
                        return
                    self.feed(chunk)
                    if len(chunk) < READ_SIZE:
                        break
        finally:
            self._report_drops(force=True)

    def drain_now(self) -> None:
        """Read what the pipe holds right now, without waiting (the child has exited and
        its last words, say an import error, must be seen before its exit is judged)."""
        for _ in range(READS_PER_WAKE):
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except OSError:  # BlockingIOError: nothing more yet; EOF is left to run()
                return
            if not chunk:
                return
            self.feed(chunk)

    def feed(self, chunk: bytes) -> None:
        """Split ``chunk`` into lines and emit (or count as dropped) each whole one."""
        self.bucket.refill(time.monotonic())
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                self._append_partial(chunk[start:])
                break
            if self.bucket.tokens < 1.0:
                # Over budget: drop every complete line left in this chunk in one go.
                last = chunk.rfind(b"\n")
                dropped = chunk.count(b"\n", start, last + 1)
                self.stats.dropped += dropped
                self._pending_drops += dropped
                self._partial.clear()
                self._partial_truncated = False
                self._append_partial(chunk[last + 1 :])
                break
            self._append_partial(chunk[start:nl])
            self._emit_partial()
            start = nl + 1
        self._report_drops()

    def _append_partial(self, data: bytes) -> None:
        room = self.max_line - len(self._partial)
        if len(data) > room:
            self._partial += data[: max(room, 0)]
            self._partial_truncated = True
        else:
            self._partial += data

    def _emit_partial(self) -> None:
        line = bytes(self._partial)
        truncated = self._partial_truncated
        self._partial.clear()
        self._partial_truncated = False
        text = line.decode("utf-8", "replace").rstrip("\r")
        if self.stream == "stderr" and not text.startswith("{"):
            self.stats.saw_error(text)
        if not self.bucket.take():
            self.stats.dropped += 1
            self._pending_drops += 1
            return
        self.stats.lines += 1
        if truncated:
            self.stats.truncated += 1
            self.log.info("output", stream=self.stream, line=text, truncated=True, **self.fields)
        elif not self._emit_structured(text):
            self.log.info("output", stream=self.stream, line=text, **self.fields)

    def _emit_structured(self, text: str) -> bool:
        """A JSON log line with an "event" (our workers, most structlog/JSON loggers) is
        re-emitted as that event with its own fields and level, not as a quoted string.
        The supervisor's fields (agent, worker, pid, stream) win over the child's."""
        if not (text.startswith("{") and text.endswith("}")):
            return False
        try:
            data = json.loads(text)
        except ValueError:
            return False
        if not isinstance(data, dict) or not isinstance(data.get("event"), str):
            return False
        event = data.pop("event")
        level = str(data.pop("level", "info")).lower()
        if level in ("error", "critical"):
            error = data.get("error")
            self.stats.saw_error(f"{event}: {error}" if error else event)
        data.pop("timestamp", None)  # ours is added again; the child's is seconds older at most
        if "logger_name" in data:
            data["child_logger"] = data.pop("logger_name")
        for key in (*self.fields, "stream", "logger", "logger_name"):
            data.pop(key, None)
        emit = getattr(self.log, level if level in _LEVELS else "info")
        emit(event, stream=self.stream, **data, **self.fields)
        return True

    def _flush_partial(self) -> None:
        if self._partial:
            self.bucket.refill(time.monotonic())
            self._emit_partial()

    def _report_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._pending_drops and (force or now - self._last_drop_report >= 5.0):
            self.log.warning(
                "output dropped",
                stream=self.stream,
                dropped=self._pending_drops,
                dropped_total=self.stats.dropped,
                **self.fields,
            )
            self._pending_drops = 0
            self._last_drop_report = now
