"""Turn a stream entry's fields into an Envelope, or say precisely why it is malformed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core_bus.envelope import Envelope
from core_bus.streams.deadletter import (
    REASON_BAD_JSON,
    REASON_BAD_UTF8,
    REASON_NO_DATA,
    REASON_NOT_ENVELOPE,
    REASON_TOO_LARGE,
    REASON_UNDECODABLE,
)

# Field names holding the envelope JSON, in lookup order (bytes first: our own
# reads use a bytes client; str for clients created with decode_responses=True).
_PAYLOAD_KEYS: tuple[bytes | str, ...] = (b"data", "data", b"envelope", "envelope")


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why an entry cannot be handled; it goes to the dead-letter stream at once."""

    reason: str
    error: str


def payload_of(fields: Mapping[Any, Any]) -> bytes | str | None:
    """The raw envelope JSON of an entry (field ``data``, or ``envelope``), if any."""
    for key in _PAYLOAD_KEYS:
        value = fields.get(key)
        if value is not None:
            return value  # type: ignore[no-any-return]
    return None


def decode_payload(raw: bytes | str | None, limit: int) -> Envelope | Malformed:
    """Parse ``raw`` with pydantic-core; classify failures (slow path only on error)."""
    if raw is None:
        return Malformed(REASON_NO_DATA, "entry has no 'data' or 'envelope' field")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > limit:
        return Malformed(REASON_TOO_LARGE, f"payload is {size} bytes, limit is {limit} bytes")
    try:
        return Envelope.from_json(raw)
    except ValidationError as exc:
        return _classify(raw, exc)
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:
        # Hostile input (e.g. 1,000-deep nesting) must never take the worker down.
        return Malformed(REASON_UNDECODABLE, f"{type(exc).__name__}: {str(exc)[:200]}")


def _classify(raw: bytes | str, exc: ValidationError) -> Malformed:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return Malformed(REASON_BAD_UTF8, f"UnicodeDecodeError: {err}")
    else:
        text = raw
    try:
        json.loads(text)
    except ValueError as err:
        return Malformed(REASON_BAD_JSON, f"{type(err).__name__}: {err}")
    except RecursionError:  # pydantic-core refused it for the same reason
        return Malformed(REASON_BAD_JSON, "RecursionError: JSON nested too deeply")
    return Malformed(REASON_NOT_ENVELOPE, f"ValidationError: {_short(exc)}")


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {err.get('msg', '')}")
    return "; ".join(parts)
