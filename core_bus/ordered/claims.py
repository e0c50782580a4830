"""XPENDING/XCLAIM steps of one ordered shard's owner (see :mod:`core_bus.ordered.subscription`).

Delivery counting: :func:`claim_backlog` and :func:`redeliver` are normal
XCLAIMs, so each counts as one delivery; :func:`own_pending` reads without
bumping any counter (XPENDING + XRANGE, not XREADGROUP ``0``).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.streams.pending import fetch_entries, pending_counts, reclaim_for_retry
from core_bus.streams.replies import text

READ_COUNT = 10
BACKLOG_PAGE = 200

#: ``(entry id, fields or None when deleted, deliveries)``
ShardEntry = tuple[str, Any, int]


async def claim_backlog(redis: AsyncRedis, stream: str, group: str, me: str) -> None:
    """XCLAIM every pending entry of the shard held by someone else (a claim = a delivery)."""
    start = "-"
    while True:
        rows = await redis.xpending_range(stream, group, start, "+", BACKLOG_PAGE)
        if not rows:
            return
        ids: list[Any] = [text(r["message_id"]) for r in rows if text(r["consumer"]) != me]
        if ids:
            await redis.xclaim(stream, group, me, 0, ids)
        if len(rows) < BACKLOG_PAGE:
            return
        start = f"({text(rows[-1]['message_id'])}"


async def own_pending(redis: AsyncRedis, stream: str, group: str, me: str) -> list[ShardEntry]:
    """Our pending entries of the shard in id order, without bumping their counters."""
    reply = await redis.xpending_range(stream, group, "-", "+", READ_COUNT, me)
    rows = pending_counts(reply)
    fetched = await fetch_entries(redis, [(stream, i) for i, _ in rows])
    return [
        (entry_id, fields, deliveries)
        for (entry_id, deliveries), (_s, _i, fields) in zip(rows, fetched, strict=True)
    ]


async def redeliver(redis: AsyncRedis, stream: str, group: str, me: str, entry_id: str) -> int:
    """XCLAIM the entry to ourselves again (bumps the counter); 0 when it is gone."""
    (claimed,) = await reclaim_for_retry(redis, group, me, [(stream, entry_id, 0)])
    return claimed.deliveries
