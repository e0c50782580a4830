"""Writing dead letters with their acks: atomic where one slot holds both, else split.

On a standalone server (and for a cluster source stream in the dead-letter
stream's slot) the XADDs, XACKs and the trim are one MULTI/EXEC. A cluster
source stream in another slot cannot share a transaction with the dead-letter
stream, so it takes the **split path**: a Lua script in the dead-letter slot
XADDs the record only if ``"<stream> <id>"`` is not yet in the
:func:`~core_bus.keys.dead_letter_seen` set (and records it), then the XACKs
follow. A crash between the two leaves the entry pending; when it comes back
and is dead-lettered again the script skips the XADD and the ack completes:
exactly one dead letter per source entry, never an ack without one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core_bus.keys import dead_letter_seen
from core_bus.streams.deadletter import (
    DLQ_MAXLEN,
    dead_letter_fields,
    queue_dead_letter,
    queue_trim,
)
from core_bus.streams.slots import is_cluster, slot_of

#: How long (ms) a split-path write is remembered; a repeat comes within the claim idle.
SEEN_HORIZON_MS = 24 * 3600 * 1000

# KEYS: dead-letter stream, seen set; ARGV: "<stream> <id>", horizon_ms, field, value, ...
# Returns the new dead letter's id, or false when that source entry was written before.
_SEEN_XADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return false end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""

# KEYS: dead-letter stream, then source streams (one slot); ARGV: group, maxlen (0: no
# trim), then per record: source key index, id, field count n, n name/value pairs.
# The MULTI of write_dead_letters as one script (Redis Cluster); returns entries trimmed.
_ATOMIC = """
local i = 3
while i <= #ARGV do
  local source = KEYS[tonumber(ARGV[i])]
  local n = tonumber(ARGV[i + 2])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[i + 2 + j] end
  redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('XACK', source, ARGV[1], ARGV[i + 1])
  i = i + 3 + 2 * n
end
if tonumber(ARGV[2]) > 0 then
  return redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[2])
end
return 0
"""

#: ``(source stream, entry id, dead-letter record)``
Record = tuple[str, str, Mapping[str, Any]]


def split_needed(redis: Any, dlq_stream: str, stream: str) -> bool:
    """True when ``stream``'s dead letters cannot be written atomically with its ack."""
    return is_cluster(redis) and slot_of(stream) != slot_of(dlq_stream)


async def write_dead_letters(
    redis: Any, dlq_stream: str, group: str, records: Sequence[Record], maxlen: int | None
) -> int:
    """Dead-letter and ack ``records``; returns how many old dead letters the trim dropped."""
    atomic = [r for r in records if not split_needed(redis, dlq_stream, r[0])]
    split = [r for r in records if split_needed(redis, dlq_stream, r[0])]
    trimmed = 0
    if is_cluster(redis):
        if atomic:  # redis-py's cluster MULTI runs each command in a thread: one script
            trimmed = await _write_atomic_script(redis, dlq_stream, group, atomic, maxlen)
    elif records or maxlen != 0:
        async with redis.pipeline(transaction=True) as pipe:
            for stream, entry_id, fields in atomic:
                queue_dead_letter(
                    pipe,
                    dlq_stream,
                    stream=stream,
                    group=group,
                    entry_id=entry_id,
                    fields=dict(fields),
                )
            queue_trim(pipe, dlq_stream, maxlen)
            replies = await pipe.execute() if len(pipe) else []
        if maxlen != 0 and replies:
            trimmed = int(replies[-1] or 0)
    if split:
        trimmed += await write_split_dead_letters(redis, dlq_stream, split, maxlen)
        async with redis.pipeline(transaction=False) as pipe:
            for stream, entry_id, _fields in split:
                pipe.xack(stream, group, entry_id)
            await pipe.execute()
    return trimmed


async def _write_atomic_script(
    redis: Any, dlq_stream: str, group: str, records: Sequence[Record], maxlen: int | None
) -> int:
    streams = list(dict.fromkeys(stream for stream, _id, _fields in records))
    limit = DLQ_MAXLEN if maxlen is None else maxlen
    args: list[Any] = [group, limit]
    for stream, entry_id, fields in records:
        args += [streams.index(stream) + 2, entry_id, len(fields)]  # KEYS[1] is the DLQ
        for name, value in fields.items():
            args += [name, value]
    return int(await redis.eval(_ATOMIC, 1 + len(streams), dlq_stream, *streams, *args) or 0)


async def write_split_dead_letters(
    redis: Any, dlq_stream: str, records: Sequence[Record], maxlen: int | None
) -> int:
    """XADD each record unless its source entry was dead-lettered before (the split path's
    first half; the caller acks after it). Returns how many old dead letters were trimmed."""
    seen = dead_letter_seen(dlq_stream)
    async with redis.pipeline(transaction=False) as pipe:
        for stream, entry_id, fields in records:
            flat: list[Any] = []
            for name, value in fields.items():
                flat.extend((name, value))
            pipe.eval(
                _SEEN_XADD, 2, dlq_stream, seen, f"{stream} {entry_id}", SEEN_HORIZON_MS, *flat
            )
        queue_trim(pipe, dlq_stream, maxlen)
        replies = await pipe.execute()
    return int(replies[-1] or 0) if maxlen != 0 and len(replies) > len(records) else 0


async def dead_letter_entry(
    redis: Any,
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
    """Move one entry to ``dlq_stream`` and ack it (atomically where one slot holds both)."""
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
    await write_dead_letters(redis, dlq_stream, group, [(stream, entry_id, fields)], None)
