"""Small, reply-normalising helpers around XPENDING, XINFO and XGROUP DELCONSUMER.

Every helper accepts any redis-py asyncio client (RESP2 or RESP3,
``decode_responses`` True or False) and treats a missing stream or group as
"nothing there" instead of raising, because the rebalancer runs against groups
that workers create lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core_bus.streams.groups import counted_lag, lag_field
from core_bus.streams.replies import text

# Atomically: delete the consumer only when it owns no pending entry (closes the
# check-then-delete race of ARCHITECTURE item 6; DELCONSUMER destroys pending
# entries). Returns -1 when the group/stream does not exist, 0 when the consumer
# still owns entries, 1 when it did not exist, 2 when it was deleted.
_DELETE_IF_EMPTY = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #pending > 0 then return 0 end
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  if c[2] == ARGV[2] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 2
  end
end
return 1
"""

DELETE_MISSING_GROUP = -1
DELETE_HAS_PENDING = 0
DELETE_NOT_FOUND = 1
DELETE_DONE = 2


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One row of XPENDING's extended form."""

    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One row of XINFO CONSUMERS (``idle`` is not a liveness signal: item 7)."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Pending and lag of one consumer group on one stream; ``lag`` None = unknown."""

    stream: str
    group: str
    pending: int
    lag: int | None
    consumers: int
    lag_note: str | None = None  # Redis gave no lag: why, and that it was counted


def is_missing(exc: ResponseError) -> bool:
    """True for NOGROUP / no such key errors (group or stream not created yet)."""
    message = str(exc)
    return "NOGROUP" in message or "no such key" in message.lower()


def _pending_row(row: Any) -> PendingEntry:
    if isinstance(row, dict):
        return PendingEntry(
            id=text(row["message_id"]),
            consumer=text(row["consumer"]),
            idle_ms=int(row["time_since_delivered"]),
            deliveries=int(row["times_delivered"]),
        )
    return PendingEntry(text(row[0]), text(row[1]), int(row[2]), int(row[3]))


async def pending_entries(
    redis: AsyncRedis,
    stream: str,
    group: str,
    *,
    consumer: str | None = None,
    start: str = "-",
    end: str = "+",
    count: int = 100,
    min_idle_ms: int | None = None,
) -> list[PendingEntry]:
    """XPENDING extended form, optionally filtered by consumer and idle time."""
    try:
        rows = await redis.xpending_range(
            stream, group, start, end, count, consumername=consumer, idle=min_idle_ms
        )
    except ResponseError as exc:
        if is_missing(exc):
            return []
        raise
    return [_pending_row(row) for row in rows or ()]


async def pending_summary(redis: AsyncRedis, stream: str, group: str) -> dict[str, int]:
    """Pending entries per consumer (XPENDING summary form); ``{}`` when the group is missing."""
    try:
        info = await redis.xpending(stream, group)
    except ResponseError as exc:
        if is_missing(exc):
            return {}
        raise
    rows = info.get("consumers") or () if isinstance(info, dict) else ()
    return {text(row["name"]): int(row["pending"]) for row in rows}


async def pending_of_ids(
    redis: AsyncRedis, stream: str, group: str, ids: list[str]
) -> dict[str, PendingEntry]:
    """The pending-list rows of ``ids`` (one pipelined XPENDING per id); absent ids are left out."""
    if not ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xpending_range(stream, group, entry_id, entry_id, 1)
    replies = await pipe.execute(raise_on_error=False)
    out: dict[str, PendingEntry] = {}
    for reply in replies:
        if isinstance(reply, Exception) or not reply:
            continue
        row = _pending_row(reply[0])
        out[row.id] = row
    return out


async def consumers_of(redis: AsyncRedis, stream: str, group: str) -> list[ConsumerInfo]:
    """XINFO CONSUMERS, or ``[]`` when the stream or group does not exist."""
    try:
        rows = await redis.xinfo_consumers(stream, group)
    except ResponseError as exc:
        if is_missing(exc):
            return []
        raise
    out: list[ConsumerInfo] = []
    for row in rows or ():
        fields = {text(k): v for k, v in row.items()}
        out.append(
            ConsumerInfo(
                name=text(fields["name"]),
                pending=int(fields.get("pending", 0)),
                idle_ms=int(fields.get("idle", 0)),
            )
        )
    return out


def _group_row(stream: str, group: str, rows: Any) -> tuple[GroupStats, str, bool] | None:
    """The group's row, its last-delivered id and whether XINFO had a lag field at all."""
    for row in rows or ():
        fields = {text(k): v for k, v in row.items()}
        if text(fields.get("name", "")) != group:
            continue
        lag, present = lag_field(fields)
        stats = GroupStats(
            stream=stream,
            group=group,
            pending=int(fields.get("pending", 0)),
            lag=lag,
            consumers=int(fields.get("consumers", 0)),
        )
        return stats, text(fields.get("last-delivered-id") or ""), present
    return None


async def group_stats(redis: AsyncRedis, streams: list[str], group: str) -> list[GroupStats]:
    """XINFO GROUPS row of ``group`` per stream (one pipeline); missing streams/groups left out."""
    if not streams:
        return []
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    replies = await pipe.execute(raise_on_error=False)
    out: list[tuple[GroupStats, str, bool]] = []
    for stream, reply in zip(streams, replies, strict=True):
        if isinstance(reply, ResponseError) and is_missing(reply):
            continue
        if isinstance(reply, Exception):
            raise reply
        row = _group_row(stream, group, reply)
        if row is not None:
            out.append(row)
    return [await _with_counted_lag(redis, row) for row in out]


async def _with_counted_lag(redis: AsyncRedis, row: tuple[GroupStats, str, bool]) -> GroupStats:
    """Where XINFO has no lag (NULL after XDEL/trim, or Redis < 7.0), count it instead."""
    stats, last_delivered, present = row
    if stats.lag is not None:
        return stats
    lag, note = await counted_lag(redis, stats.stream, last_delivered, reported=present)
    return GroupStats(stats.stream, stats.group, stats.pending, lag, stats.consumers, note)


class ConsumerDeleter:
    """``XGROUP DELCONSUMER`` only when the consumer's pending list is empty, atomically."""

    def __init__(self, redis: AsyncRedis) -> None:
        self._script = redis.register_script(_DELETE_IF_EMPTY)

    async def delete_if_empty(self, stream: str, group: str, consumer: str) -> int:
        """``DELETE_MISSING_GROUP``, ``_HAS_PENDING``, ``_NOT_FOUND`` or ``_DONE``."""
        result = await self._script(keys=[stream], args=[group, consumer])
        return int(result)
