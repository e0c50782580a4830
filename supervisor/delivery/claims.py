"""Redis steps the rebalancer is made of: claim, look up, dead-letter.

Stateless functions over any redis-py asyncio client; the policy (who gets
what, when, how many batches, counters and logs) stays in
:mod:`supervisor.delivery.rebalance`. Every claim here is a normal (non-JUSTID) XCLAIM
or XAUTOCLAIM, so it bumps the entry's delivery counter once, except the
``justid`` claims of crash suspects (see :mod:`core_bus.consume.suspects`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core_bus.consume.decode import payload_of
from core_bus.streams.deadletter import (
    REASON_POISON,
    dead_letter_fields,
)
from core_bus.streams.dlqwrite import write_dead_letters
from core_bus.streams.replies import Entry, entries_of, fields_of, text
from supervisor.delivery.consumers import is_missing, pending_entries


def claimed_entries(raw: Any) -> tuple[list[Entry], int]:
    """XCLAIM/XAUTOCLAIM entry list as ``(entries with payload, number of nil entries)``.

    Redis 6.2 answers a claimed-but-deleted entry with a bare nil (redis-py:
    ``(None, None)``), without its id; Redis 7 leaves such entries out.
    """
    entries: list[Entry] = []
    nils = 0
    for item in raw or ():
        if item is None or item[0] is None or len(item) < 2 or item[1] is None:
            nils += 1
            continue
        entries.append((text(item[0]), fields_of(item[1])))
    return entries, nils


async def xrange_each(redis: AsyncRedis, stream: str, ids: Sequence[str]) -> list[Any]:
    """One XRANGE reply per id, in one round trip; an empty reply means the entry is gone."""
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id, count=1)
    return list(await pipe.execute())


async def fetch_or_ack(
    redis: AsyncRedis, stream: str, group: str, ids: Sequence[str]
) -> tuple[dict[str, Entry], list[str]]:
    """Look each id up (one round trip) and XACK those whose entry is gone.

    A deleted or trimmed entry can never be delivered again, so its id is
    acked wherever it is still pending. Returns ``(entries found by id, vanished ids)``.
    """
    found: dict[str, Entry] = {}
    vanished: list[str] = []
    for entry_id, raw in zip(ids, await xrange_each(redis, stream, ids), strict=True):
        got = entries_of(raw)
        if got:
            found[entry_id] = got[0]
        else:
            vanished.append(entry_id)
    if vanished:
        await redis.xack(stream, group, *vanished)
    return found, vanished


async def ack_vanished_between(
    redis: AsyncRedis, stream: str, group: str, consumer: str, start: str, end: str, *, count: int
) -> None:
    """Ack ``consumer``'s pending ids in ``[start, end)`` whose entry is gone ("0-0": no end).

    For Redis 6.2, where XAUTOCLAIM moves deleted entries to the receiver as
    id-less nils somewhere in the range it scanned.
    """
    last = "+" if end == "0-0" else f"({end}"
    rows = await pending_entries(
        redis, stream, group, consumer=consumer, start=start, end=last, count=count
    )
    ids = [row.id for row in rows]
    if ids:
        await fetch_or_ack(redis, stream, group, ids)


async def claim_to(
    redis: AsyncRedis,
    stream: str,
    group: str,
    plan: Mapping[str, Sequence[str]],
    min_idle_ms: int,
    *,
    justid: bool = False,
) -> dict[str, set[str]]:
    """XCLAIM ``plan[receiver]`` ids to each receiver in one round trip; ids each one got.

    ``min_idle_ms`` fences the claim: an entry someone else claimed meanwhile
    has a fresh idle time and is skipped. ``justid`` claims without counting a
    delivery (crash suspects: nobody knows yet whether they were even run).
    """
    pipe = redis.pipeline(transaction=False)
    receivers = [r for r in plan if plan[r]]
    for receiver in receivers:
        pipe.xclaim(stream, group, receiver, min_idle_ms, list(plan[receiver]), justid=justid)
    replies = await pipe.execute() if receivers else []
    if justid:
        return {
            receiver: {text(i) for i in reply or () if i is not None}
            for receiver, reply in zip(receivers, replies, strict=True)
        }
    return {
        receiver: {entry_id for entry_id, _ in claimed_entries(reply)[0]}
        for receiver, reply in zip(receivers, replies, strict=True)
    }


@dataclass(frozen=True, slots=True)
class AutoclaimPage:
    """One XAUTOCLAIM reply: where to go on, what was claimed, what was gone."""

    next_cursor: str
    claimed: list[Entry]
    nils: int  # Redis 6.2: deleted entries moved to the receiver as id-less nils
    deleted: int  # Redis 7: ids of deleted entries dropped from the pending list


async def autoclaim(
    redis: AsyncRedis,
    stream: str,
    group: str,
    receiver: str,
    min_idle_ms: int,
    cursor: str,
    count: int,
) -> AutoclaimPage | None:
    """One XAUTOCLAIM batch to ``receiver``; None when the stream or group is missing."""
    try:
        reply = await redis.execute_command(  # type: ignore[no-untyped-call]
            "XAUTOCLAIM", stream, group, receiver, min_idle_ms, cursor, "COUNT", count
        )
    except ResponseError as exc:
        if is_missing(exc):
            return None
        raise
    claimed, nils = claimed_entries(reply[1])
    deleted = len(reply[2]) if len(reply) > 2 and reply[2] else 0
    return AutoclaimPage(text(reply[0]), claimed, nils, deleted)


async def dead_letter_poison(
    redis: AsyncRedis,
    dlq_stream: str,
    stream: str,
    group: str,
    entries: Sequence[tuple[Entry, int]],
    *,
    max_deliveries: int,
    consumer: str,
    reason: str = REASON_POISON,
    why: str = "",
    maxlen: int | None = None,
) -> int:
    """XADD each ``(entry, deliveries)`` to ``dlq_stream`` and XACK it, in one MULTI/EXEC
    (on a cluster, the split path when the stream is in another slot).

    ``why`` replaces the default error text ("delivered N times ..."); returns
    how many old dead letters the trim to ``maxlen`` dropped."""
    records = []
    for (entry_id, fields), deliveries in entries:
        record = dead_letter_fields(
            data=payload_of(fields) if fields else None,
            original=fields,
            reason=reason,
            error=why.format(deliveries=deliveries)
            or (
                f"delivered {deliveries} times "
                f"(max_deliveries={max_deliveries}); last consumer {consumer}"
            ),
            deliveries=deliveries,
            source_stream=stream,
            source_id=entry_id,
            group=group,
            consumer=consumer,
        )
        records.append((stream, entry_id, record))
    return await write_dead_letters(redis, dlq_stream, group, records, maxlen)
