"""Crash suspects: entries that were pending on a worker when it died.

Which of them killed it is unknown: the one handler that ran it, any of the
handlers running beside it, or none (read-ahead never handed to a handler).
So the supervisor moves them to live siblings *without* counting a delivery
(XCLAIM JUSTID) and records each in a hash, ``keys.suspects(group)``:
field ``"<entry id> <stream>"``, value ``""``. A receiver runs suspects one
at a time with no other handler beside it, after setting the value to its
own consumer name. If it dies then, the supervisor knows exactly which entry
did it (value == the dead consumer): only that one gets a counted delivery,
and past ``max_deliveries`` it is dead-lettered with reason ``worker_crashed``.
An isolated run that ends (success or an exception) removes the field.

The hash expires a day after its last write, so fields of entries acked or
dead-lettered elsewhere do not pile up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.streams.replies import text

#: Seconds the suspects hash lives after its last write.
SUSPECTS_TTL = 86_400


def suspect_field(stream: str, entry_id: str) -> str:
    return f"{entry_id} {stream}"


def queue_mark_suspects(pipe: Any, key: str, pairs: Iterable[tuple[str, str]]) -> None:
    """Queue HSET field -> "" for each ``(stream, id)`` (and the TTL) on a pipeline."""
    mapping = {suspect_field(stream, entry_id): "" for stream, entry_id in pairs}
    if mapping:
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, SUSPECTS_TTL)


async def isolating_consumers(
    redis: AsyncRedis, key: str, pairs: Sequence[tuple[str, str]]
) -> list[str | None]:
    """Per pair: None (not a suspect), "" (suspect) or the consumer isolating it."""
    if not pairs:
        return []
    values = await redis.hmget(key, [suspect_field(s, i) for s, i in pairs])
    return [None if v is None else text(v) for v in values]


async def mark_isolating(
    redis: AsyncRedis, key: str, stream: str, entry_id: str, consumer: str
) -> None:
    """Record that ``consumer`` runs this suspect alone now (before its handler starts)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, suspect_field(stream, entry_id), consumer)
        pipe.expire(key, SUSPECTS_TTL)
        await pipe.execute()


async def clear_suspect(redis: AsyncRedis, key: str, stream: str, entry_id: str) -> None:
    """The isolated run ended without killing its worker: not a suspect any more."""
    await redis.hdel(key, suspect_field(stream, entry_id))
