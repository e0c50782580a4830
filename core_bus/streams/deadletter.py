"""Dead-letter records: written and acked in one MULTI/EXEC, never acked-and-dropped."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.streams.replies import Fields, text

DLQ_MAXLEN = 100_000

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
        )


def dead_letter_fields(
    *,
    data: bytes | str | None,
    reason: str,
    error: str,
    deliveries: int,
    source_stream: str,
    source_id: str,
    group: str,
    consumer: str,
) -> dict[str, Any]:
    """The fields of a dead-letter entry (``data`` is the original payload, verbatim)."""
    return {
        "data": data if data is not None else b"",
        "reason": reason,
        "error": error[:2000],
        "deliveries": deliveries,
        "source_stream": source_stream,
        "source_id": source_id,
        "group": group,
        "consumer": consumer,
        "dead_lettered_at": datetime.now(UTC).isoformat(),
    }


def queue_dead_letter(
    pipe: Any,
    dlq_stream: str,
    *,
    stream: str,
    group: str,
    entry_id: str,
    fields: dict[str, Any],
) -> None:
    """Queue XADD to the dead-letter stream and XACK of the source on a MULTI pipeline."""
    pipe.xadd(dlq_stream, fields, maxlen=DLQ_MAXLEN, approximate=True)
    pipe.xack(stream, group, entry_id)


async def dead_letter_entry(
    redis: AsyncRedis,
    dlq_stream: str,
    *,
    stream: str,
    group: str,
    entry_id: str,
    data: bytes | str | None,
    reason: str,
    error: str,
    deliveries: int,
    consumer: str,
) -> None:
    """Move one entry to ``dlq_stream`` and ack it atomically (MULTI/EXEC)."""
    fields = dead_letter_fields(
        data=data,
        reason=reason,
        error=error,
        deliveries=deliveries,
        source_stream=stream,
        source_id=entry_id,
        group=group,
        consumer=consumer,
    )
    async with redis.pipeline(transaction=True) as pipe:
        queue_dead_letter(
            pipe, dlq_stream, stream=stream, group=group, entry_id=entry_id, fields=fields
        )
        await pipe.execute()
