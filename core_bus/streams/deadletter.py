"""Dead-letter records: written and acked in one MULTI/EXEC, never acked-and-dropped.

A dead letter carries the original payload (``data``) and, as ``fields``,
every original field of the entry as JSON (bytes that are not UTF-8 are
base64 under ``{"b64": ...}``), bounded by :data:`ORIGINAL_LIMIT`: an entry
without ``data``/``envelope`` can still be inspected and replayed. The stream
is trimmed to ``dead_letter_maxlen`` (approximately) by an XTRIM in the same
MULTI/EXEC, whose reply says how many old dead letters were dropped.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core_bus.streams.replies import Fields, text

DLQ_MAXLEN = 100_000
#: Bytes of original fields a dead letter keeps (beyond that: ``fields_truncated``).
ORIGINAL_LIMIT = 1024 * 1024

# Reasons (the ``reason`` field of a dead letter)
REASON_POISON = "max_deliveries"
REASON_NO_DATA = "no_data_field"
REASON_BAD_UTF8 = "invalid_utf8"
REASON_BAD_JSON = "invalid_json"
REASON_NOT_ENVELOPE = "not_an_envelope"
REASON_TOO_LARGE = "too_large"
REASON_DELETED = "entry_deleted"
REASON_UNDECODABLE = "undecodable"
REASON_CRASHED = "worker_crashed"
REASON_TIMEOUT = "handler_timeout"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a dead-letter stream, as read back by tools."""

    id: str
    reason: str
    error: str
    deliveries: int
    source_stream: str
    source_id: str
    group: str
    consumer: str
    dead_lettered_at: str
    data: bytes | None
    #: every field of the original entry (None: not recorded, e.g. an older dead letter)
    original: dict[str, bytes] | None = None

    @classmethod
    def from_fields(cls, entry_id: str, fields: Fields) -> DeadLetter:
        raw = fields.get("data")
        return cls(
            id=entry_id,
            reason=text(fields.get("reason", "")),
            error=text(fields.get("error", "")),
            deliveries=int(text(fields.get("deliveries", "0")) or 0),
            source_stream=text(fields.get("source_stream", "")),
            source_id=text(fields.get("source_id", "")),
            group=text(fields.get("group", "")),
            consumer=text(fields.get("consumer", "")),
            dead_lettered_at=text(fields.get("dead_lettered_at", "")),
            data=raw.encode() if isinstance(raw, str) else raw,
            original=decode_original(fields.get("fields")),
        )


def _value_json(value: Any) -> Any:
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(raw).decode("ascii")}


def encode_original(fields: Mapping[Any, Any] | None) -> tuple[str, bool]:
    """Every original field as JSON, dropping fields past :data:`ORIGINAL_LIMIT`."""
    out: dict[str, Any] = {}
    size = 0
    truncated = False
    for key, value in (fields or {}).items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        encoded = _value_json(value)
        size += len(name) + (len(value) if isinstance(value, bytes | str) else 16)
        if size > ORIGINAL_LIMIT:
            truncated = True
            break
        out[name] = encoded
    return json.dumps(out, separators=(",", ":")), truncated


def decode_original(raw: Any) -> dict[str, bytes] | None:
    """The original fields back from a dead letter's ``fields`` (None when absent/bad)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    out: dict[str, bytes] = {}
    for name, value in data.items():
        if isinstance(value, dict) and "b64" in value:
            out[name] = base64.b64decode(value["b64"])
        else:
            out[name] = str(value).encode()
    return out


def dead_letter_fields(
    *,
    data: bytes | str | None,
    original: Mapping[Any, Any] | None = None,
    reason: str,
    error: str,
    deliveries: int,
    source_stream: str,
    source_id: str,
    group: str,
    consumer: str,
) -> dict[str, Any]:
    """The fields of a dead-letter entry (``data`` is the original payload, verbatim)."""
    kept, truncated = encode_original(original)
    record: dict[str, Any] = {
        "data": data if data is not None else b"",
        "reason": reason,
        "error": error[:2000],
        "deliveries": deliveries,
        "source_stream": source_stream,
        "source_id": source_id,
        "group": group,
        "consumer": consumer,
        "dead_lettered_at": datetime.now(UTC).isoformat(),
        "fields": kept,
    }
    if truncated:
        record["fields_truncated"] = "1"
    return record


def queue_dead_letter(
    pipe: Any,
    dlq_stream: str,
    *,
    stream: str,
    group: str,
    entry_id: str,
    fields: dict[str, Any],
) -> None:
    """Queue XADD to the dead-letter stream and XACK of the source on a MULTI pipeline.

    Trimming is a separate :func:`queue_trim` at the end of the pipeline, so
    its reply (entries dropped) can be counted.
    """
    pipe.xadd(dlq_stream, fields)
    pipe.xack(stream, group, entry_id)


def queue_trim(pipe: Any, dlq_stream: str, maxlen: int | None) -> None:
    """Queue XTRIM MAXLEN ~ ``maxlen`` (None: :data:`DLQ_MAXLEN`; 0: never trim)."""
    limit = DLQ_MAXLEN if maxlen is None else maxlen
    if limit > 0:
        pipe.xtrim(dlq_stream, maxlen=limit, approximate=True)


class TrimReport:
    """Counts trimmed dead letters; one log line per trim episode (60 s quiet ends one)."""

    QUIET = 60.0

    def __init__(self, log: Any, **fields: Any) -> None:
        self._log = log
        self._fields = fields
        self.trimmed = 0
        self._last: float | None = None

    def add(self, dlq_stream: str, dropped: Any, maxlen: int | None) -> None:
        count = int(dropped or 0) if not isinstance(dropped, BaseException) else 0
        if count <= 0:
            return
        now = time.monotonic()
        if self._last is None or now - self._last > self.QUIET:
            self._log.warning(
                "dead_letters_trimmed",
                dlq_stream=dlq_stream,
                dropped=count,
                dead_letter_maxlen=DLQ_MAXLEN if maxlen is None else maxlen,
                **self._fields,
            )
        self._last = now
        self.trimmed += count
