"""Reads of a consumer's own pending entries (PEL): history, XPENDING pages, retry claims.

Which commands bump the Redis delivery counter matters here: XREADGROUP history
reads and XCLAIM (without JUSTID) do; XPENDING and XRANGE do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.streams.replies import stream_pairs, text
from core_bus.streams.slots import by_slot, is_cluster

# KEYS: stream; ARGV: group, consumer, XPENDING low id, XREADGROUP id, count.
# history_page's two reads in one atomic step (Redis Cluster).
_HISTORY = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[5], ARGV[2])
local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[5],
  'STREAMS', KEYS[1], ARGV[4])
return {pending, read}
"""

# KEYS: streams of one slot; ARGV: group, consumer, then (key index, id, min idle ms) per
# item. reclaim_for_retry's XCLAIM + XPENDING pairs in one atomic step (Redis Cluster).
_RECLAIM = """
local out = {}
for i = 3, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  out[#out + 1] = redis.call('XCLAIM', key, ARGV[1], ARGV[2], ARGV[i + 2], ARGV[i + 1])
  out[#out + 1] = redis.call('XPENDING', key, ARGV[1], ARGV[i + 1], ARGV[i + 1], 1)
end
return out
"""

#: Entry fields (raw redis-py mapping) or ``None`` for an entry that no longer exists.
RawFields = Mapping[Any, Any] | None


@dataclass(frozen=True, slots=True)
class Claimed:
    """Outcome of re-claiming one entry for a retry."""

    entry_id: str
    owned: bool  # False: no longer ours (acked, claimed by someone else) - forget it
    fields: RawFields  # None when owned but the entry was deleted
    deliveries: int  # Redis delivery counter after the claim


def pending_counts(reply: Any) -> list[tuple[str, int]]:
    """``[(id, times_delivered)]`` from an XPENDING range reply (dict or list rows)."""
    return [(entry_id, delivered) for entry_id, _consumer, delivered in pending_rows(reply)]


def pending_rows(reply: Any) -> list[tuple[str, str, int]]:
    """``[(id, consumer, times_delivered)]`` from an XPENDING range reply."""
    out: list[tuple[str, str, int]] = []
    for row in reply or ():
        if isinstance(row, Mapping):
            out.append(
                (text(row["message_id"]), text(row["consumer"]), int(row["times_delivered"]))
            )
        else:
            out.append((text(row[0]), text(row[1]), int(row[3])))
    return out


def entry_fields(raw: Any) -> RawFields:
    """Normalise one entry payload: empty or nil means the entry was deleted."""
    if not raw:
        return None
    if isinstance(raw, Mapping):
        return raw
    items = list(raw)
    return {items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)}


async def history_page(
    redis: AsyncRedis, stream: str, group: str, consumer: str, after: str, count: int
) -> tuple[dict[str, int], list[tuple[str, RawFields]]]:
    """Next page of our own pending entries after ``after`` (``"0"`` = from the start).

    Returns the delivery counters *before* this read and the entries (one
    MULTI/EXEC, so both describe the same entries). The read bumps every
    counter by one.
    """
    low = "-" if after == "0" else f"({after}"
    if is_cluster(redis):  # redis-py's cluster MULTI cannot queue XREADGROUP: one script
        pending_reply, read_reply_raw = await redis.eval(
            _HISTORY, 1, stream, group, consumer, low, after, count
        )
    else:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xpending_range(stream, group, low, "+", count, consumer)
            pipe.xreadgroup(group, consumer, {stream: after}, count=count)
            pending_reply, read_reply_raw = await pipe.execute()
    counts = dict(pending_counts(pending_reply))
    entries: list[tuple[str, RawFields]] = []
    for _stream, raw_entries in stream_pairs(read_reply_raw):
        for item in raw_entries:
            if not item:
                continue
            entries.append((text(item[0]), entry_fields(item[1] if len(item) > 1 else None)))
    return counts, entries


async def own_pending(
    redis: AsyncRedis, streams: Sequence[str], group: str, consumer: str, page: int = 1000
) -> dict[str, list[tuple[str, int]]]:
    """Every pending entry of ``consumer`` per stream, with its delivery counter.

    One pipelined XPENDING per stream when the lists are short (the idle case);
    pages further only for streams whose first page was full.
    """
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xpending_range(stream, group, "-", "+", page, consumer)
        replies = await pipe.execute()
    result: dict[str, list[tuple[str, int]]] = {}
    for stream, reply in zip(streams, replies, strict=True):
        rows = pending_counts(reply)
        while len(rows) and len(rows) % page == 0:
            more = pending_counts(
                await redis.xpending_range(stream, group, f"({rows[-1][0]}", "+", page, consumer)
            )
            if not more:
                break
            rows.extend(more)
        result[stream] = rows
    return result


async def fetch_entries(
    redis: AsyncRedis, wanted: Sequence[tuple[str, str]]
) -> list[tuple[str, str, RawFields]]:
    """Payloads of ``(stream, id)`` pairs by XRANGE (pipelined; counters untouched)."""
    if not wanted:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for stream, entry_id in wanted:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        replies = await pipe.execute()
    out: list[tuple[str, str, RawFields]] = []
    for (stream, entry_id), reply in zip(wanted, replies, strict=True):
        fields = entry_fields(reply[0][1]) if reply else None
        out.append((stream, entry_id, fields))
    return out


async def reclaim_for_retry(
    redis: AsyncRedis,
    group: str,
    consumer: str,
    items: Sequence[tuple[str, str, int]],
) -> list[Claimed]:
    """XCLAIM ``(stream, id, min_idle_ms)`` to ourselves again, bumping the counter.

    ``min_idle_ms`` keeps us from stealing an entry somebody else claimed in
    the meantime (a claim resets the idle time). The counter is read back with
    XPENDING in the same MULTI/EXEC (on Redis Cluster: one script per slot).
    """
    replies: list[Any] = [None] * (2 * len(items))
    if not is_cluster(redis):
        async with redis.pipeline(transaction=True) as pipe:
            for stream, entry_id, min_idle in items:
                pipe.xclaim(stream, group, consumer, min_idle, [entry_id])
                pipe.xpending_range(stream, group, entry_id, entry_id, 1)
            replies = await pipe.execute()
    else:  # one script per slot (redis-py's cluster MULTI runs each command in a thread)
        for batch in by_slot(range(len(items)), key=lambda n: items[n][0]):
            streams = list(dict.fromkeys(items[n][0] for n in batch))
            args: list[Any] = [group, consumer]
            for n in batch:
                stream, entry_id, min_idle = items[n]
                args += [streams.index(stream) + 1, entry_id, min_idle]
            got = await redis.eval(_RECLAIM, len(streams), *streams, *args)
            for k, n in enumerate(batch):
                replies[2 * n], replies[2 * n + 1] = got[2 * k], got[2 * k + 1]
    out: list[Claimed] = []
    for index, (_stream, entry_id, _idle) in enumerate(items):
        claimed_reply, pending_reply = replies[2 * index], replies[2 * index + 1]
        rows = pending_counts(pending_reply)
        deliveries = rows[0][1] if rows else 0
        if not claimed_reply:
            out.append(Claimed(entry_id, False, None, deliveries))
            continue
        first = claimed_reply[0]
        fields = entry_fields(first[1]) if first is not None and len(first) > 1 else None
        out.append(Claimed(entry_id, bool(rows), fields, deliveries))
    return out


class HeldEntry:
    """One entry this process holds until it is acked or dead-lettered (slow paths only)."""

    __slots__ = ("deliveries", "entry_id", "fields", "retry_delay", "stream")

    def __init__(self, stream: str, entry_id: str, fields: RawFields, deliveries: int) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.fields = fields
        self.deliveries = deliveries  # Redis delivery counter of the current attempt
        self.retry_delay = 0.0
