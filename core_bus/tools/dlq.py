"""Dead-letter streams for operators: find, list, replay, purge.

A target names dead letters in one of three ways, tried in this order:

1. a dead-letter stream itself (``AG1:dlq:<group>``);
2. a consumer group or agent name whose ``keys.dead_letter(name)`` exists;
3. a source stream: the dead-letter streams of its consumer groups (or, when it
   has none or no longer exists, every dead-letter stream), keeping only entries
   whose ``source_stream`` is that stream.

Replay re-adds the original envelope to its ``source_stream`` and deletes the
dead letter in one Lua script, so an entry leaves the dead-letter stream only
once it is back (and two operators replaying at once replay it once; on Redis
Cluster with the two streams in different slots: re-add, then delete, so a crash
in between replays it twice but never loses it). Re-adding
resets Redis' delivery counter, so the envelope's ``meta["dlq_replays"]`` counts
how often it was replayed and ``meta["dlq_last_reason"]`` keeps why it failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.publish import DATA_FIELD
from core_bus.settings import get_settings
from core_bus.streams.deadletter import DeadLetter
from core_bus.streams.groups import UnknownStream, ensure_stream, group_infos
from core_bus.streams.replies import entries_of, text
from core_bus.streams.slots import keys_for, one_slot

log = get_logger("core_bus.tools.dlq")

PAGE = 1000

# KEYS: dead-letter stream, source stream.
# ARGV: dead-letter id, maxlen (0 = none), then field, value, field, value ...
# Returns the new entry id, or false when the dead letter is already gone.
_REPLAY_LUA = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id
if tonumber(ARGV[2]) > 0 then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
else
  id = redis.call('XADD', KEYS[2], '*', unpack(fields))
end
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


@dataclass(frozen=True, slots=True)
class DlqTarget:
    """Where a target's dead letters live, and the source filter when it named a stream."""

    streams: list[str]
    source_stream: str | None = None


@dataclass
class ReplayResult:
    replayed: list[tuple[str, str, str]] = field(default_factory=list)  # (dlq, id, new id)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (dlq, id, why)


def _keys(redis: AsyncRedis) -> StreamKeyBuilder:
    """Tagged names for a cluster client (``--redis-mode cluster`` or ``REDIS_MODE``)."""
    return keys_for(redis, get_settings().bus_namespace)


async def _is_stream(redis: AsyncRedis, key: str) -> bool:
    return text(await redis.type(key)) == "stream"


async def resolve_target(redis: AsyncRedis, target: str) -> DlqTarget:
    """Map a dead-letter stream, group/agent name or source stream to dead-letter streams.

    :raises UnknownStream: none of the three readings names anything that exists.
    """
    keys = _keys(redis)
    prefix = keys.dead_letter("")
    if target.startswith(prefix):
        await ensure_stream(redis, target)
        return DlqTarget([target])
    if await _is_stream(redis, keys.dead_letter(target)):
        return DlqTarget([keys.dead_letter(target)])
    if await _is_stream(redis, target):
        groups = await group_infos(redis, target, with_consumers=False)
        streams = [keys.dead_letter(g.name) for g in groups]
        existing = [s for s in streams if await _is_stream(redis, s)]
        if existing:
            return DlqTarget(existing, source_stream=target)
    # a source stream without groups (or deleted since): look through every DLQ
    every = DlqTarget(await _all_dead_letter_streams(redis), source_stream=target)
    if await _is_stream(redis, target) or await list_dead_letters(redis, every):
        return every
    raise UnknownStream(
        f"no dead letters for {target!r}: {keys.dead_letter(target)} does not exist, "
        f"{target!r} is not a stream, and no dead letter came from a stream of that name"
    )


async def _all_dead_letter_streams(redis: AsyncRedis) -> list[str]:
    found = [
        text(key)
        async for key in redis.scan_iter(
            match=_keys(redis).dead_letter_pattern(), count=1000, _type="stream"
        )
    ]
    return sorted(found)


async def _read_all(redis: AsyncRedis, stream: str) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    start = "-"
    while True:
        page = entries_of(await redis.xrange(stream, min=start, max="+", count=PAGE))
        for entry_id, fields in page:
            if fields is not None:
                out.append(DeadLetter.from_fields(entry_id, fields))
        if len(page) < PAGE:
            return out
        start = "(" + page[-1][0]


async def list_dead_letters(redis: AsyncRedis, target: DlqTarget) -> list[tuple[str, DeadLetter]]:
    """Every dead letter of ``target`` as ``(dead-letter stream, record)``, oldest first."""
    result: list[tuple[str, DeadLetter]] = []
    for stream in target.streams:
        for letter in await _read_all(redis, stream):
            if target.source_stream is None or letter.source_stream == target.source_stream:
                result.append((stream, letter))
    return result


def replay_payload(letter: DeadLetter) -> bytes:
    """The envelope to re-add, with the replay counted in ``meta``.

    :raises ValueError: the dead letter's data is not a valid Envelope (a malformed
        entry: replaying it would only dead-letter it again).
    """
    if not letter.data:
        raise ValueError("the dead letter has no data")
    env = Envelope.from_json(letter.data)
    env.meta["dlq_replays"] = int(env.meta.get("dlq_replays", 0) or 0) + 1
    env.meta["dlq_last_reason"] = letter.reason
    env.meta["dlq_last_replayed_at"] = datetime.now(UTC).isoformat()
    return env.to_json()


async def replay_dead_letters(
    redis: AsyncRedis, target: DlqTarget, ids: list[str] | None = None
) -> ReplayResult:
    """Re-add dead letters (all of them, or those with ``ids``) to their source streams."""
    script = redis.register_script(_REPLAY_LUA)
    maxlen = get_settings().bus_stream_maxlen
    wanted = set(ids) if ids is not None else None
    result = ReplayResult()
    letters = await list_dead_letters(redis, target)
    if wanted is not None:
        found = {letter.id for _, letter in letters}
        for missing in sorted(wanted - found):
            result.skipped.append(("", missing, "no such dead letter"))
    for dlq, letter in letters:
        if wanted is not None and letter.id not in wanted:
            continue
        if not letter.source_stream:
            result.skipped.append((dlq, letter.id, "no source_stream recorded"))
            continue
        flat: list[bytes | str] = []
        if not letter.data and letter.original:
            # no envelope at all (another producer's format): put back every original field
            for name, value in letter.original.items():
                flat.extend((name, value))
        else:
            try:
                flat = [DATA_FIELD, replay_payload(letter)]
            except ValueError as exc:
                why = f"not an Envelope ({letter.reason}): {str(exc).splitlines()[0]}"
                result.skipped.append((dlq, letter.id, why))
                continue
        if one_slot(redis, dlq, letter.source_stream):
            new_id = await script(keys=[dlq, letter.source_stream], args=[letter.id, maxlen, *flat])
        else:
            new_id = await _replay_split(redis, dlq, letter, maxlen, flat)
        if not new_id:
            result.skipped.append((dlq, letter.id, "already gone (replayed or purged meanwhile)"))
            continue
        result.replayed.append((dlq, letter.id, text(new_id)))
        log.info(
            "dlq_replayed",
            dlq=dlq,
            entry_id=letter.id,
            stream=letter.source_stream,
            new_id=text(new_id),
        )
    return result


async def _replay_split(
    redis: AsyncRedis, dlq: str, letter: DeadLetter, maxlen: int, flat: list[bytes | str]
) -> Any:
    """Redis Cluster, source and dead-letter stream in two slots: re-add, then delete the
    dead letter (a crash in between replays it twice: at least once, never lost). Two
    operators at once may both re-add; only one XDEL counts, the other is reported."""
    if not await redis.xrange(dlq, letter.id, letter.id, count=1):
        return None
    pairs: dict[Any, Any] = dict(zip(flat[::2], flat[1::2], strict=True))
    new_id = await redis.xadd(letter.source_stream, pairs, maxlen=maxlen or None, approximate=True)
    await redis.xdel(dlq, letter.id)
    return new_id


async def purge_dead_letters(
    redis: AsyncRedis, target: DlqTarget, ids: list[str] | None = None
) -> int:
    """Delete dead letters (the target's, or only those with ``ids``); returns how many.

    Deletes by id (XDEL), never the whole key: a dead letter that arrives while an
    operator confirms a purge of what they saw is kept.
    """
    wanted = set(ids) if ids is not None else None
    by_stream: dict[str, list[str]] = {}
    for dlq, letter in await list_dead_letters(redis, target):
        if wanted is None or letter.id in wanted:
            by_stream.setdefault(dlq, []).append(letter.id)
    deleted = 0
    for dlq, entry_ids in by_stream.items():
        for start in range(0, len(entry_ids), PAGE):
            deleted += int(await redis.xdel(dlq, *entry_ids[start : start + PAGE]))
    if deleted:
        log.info("dlq_purged", target=target.streams, count=deleted)
    return deleted
