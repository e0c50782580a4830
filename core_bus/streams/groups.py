"""Consumer groups of a stream: the one ``ensure_group``, and their state (XINFO).

The XINFO readers are read-only. ``lag`` may be NULL in Redis (a group created
at an arbitrary id, or entries deleted since) or missing (Redis < 7.0): then it is
counted instead (:func:`counted_lag`: the entries after the group's last-delivered
id, up to :data:`LAG_COUNT_CAP`) and ``lag_note`` says why; never a silent 0.
``idle`` of a consumer is the last *attempted* interaction on Redis >= 7.2, so a
blocked reader does not look idle; before 7.2 it does — do not judge liveness by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from core_bus.errors import BusError
from core_bus.streams.replies import text


class UnknownStream(BusError):
    """The key does not exist or is not a stream."""


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int
    inactive_ms: int | None  # Redis >= 7.2 only


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    entries_read: int | None
    lag: int | None
    consumer_list: list[ConsumerInfo] = field(default_factory=list)
    lag_note: str | None = None  # why Redis gave no lag and how it was counted instead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(info: Any, name: str) -> Any:
    """A field of an XINFO reply dict whose keys may be str or bytes."""
    if name in info:
        return info[name]
    return info.get(name.encode())


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    return int(text(value))


#: The most entries :func:`counted_lag` counts (server side, in one Lua call).
LAG_COUNT_CAP = 10_000
#: Entries after an id, counted in Redis (no payload crosses the network); 6.2 has ``(``.
_COUNT_AFTER = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return #entries
"""
LAG_NOTE_MISSING = "Redis < 7.0 reports no lag"
LAG_NOTE_NULL = (
    "Redis reports lag NULL (entries deleted or trimmed after the group's position, "
    "or the group was created at an arbitrary id)"
)


async def counted_lag(
    redis: AsyncRedis, stream: str, last_delivered_id: str, *, reported: bool
) -> tuple[int | None, str]:
    """The lag Redis did not give: entries after ``last_delivered_id`` (at most
    :data:`LAG_COUNT_CAP`), and the note shown with it. ``reported``: the reply had a
    ``lag`` field (NULL) rather than none at all (Redis < 7.0)."""
    why = LAG_NOTE_NULL if reported else LAG_NOTE_MISSING
    if not last_delivered_id:
        return None, why
    count = int(await redis.eval(_COUNT_AFTER, 1, stream, last_delivered_id, LAG_COUNT_CAP))
    if count >= LAG_COUNT_CAP:
        return count, f"{why}; counted at least {count} entries after {last_delivered_id}"
    return count, f"{why}; counted the entries after {last_delivered_id}"


def lag_field(info: Any) -> tuple[int | None, bool]:
    """XINFO GROUPS ``lag`` of one group row, and whether the field was there at all."""
    present = "lag" in info or b"lag" in info
    return _int_or_none(_get(info, "lag")), present


async def ensure_group(redis: AsyncRedis, stream: str, group: str, start_id: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream), tolerating BUSYGROUP."""
    try:
        await redis.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_stream(redis: AsyncRedis, stream: str) -> None:
    """:raises UnknownStream: ``stream`` is missing or of another type."""
    kind = text(await redis.type(stream))
    if kind == "none":
        raise UnknownStream(f"no such stream: {stream}")
    if kind != "stream":
        raise UnknownStream(f"{stream} is a {kind}, not a stream")


async def group_infos(
    redis: AsyncRedis, stream: str, *, with_consumers: bool = True
) -> list[GroupInfo]:
    """Every consumer group of ``stream`` with its consumers (one round trip per group).

    :raises UnknownStream: ``stream`` is missing or not a stream.
    """
    await ensure_stream(redis, stream)
    try:
        raw_groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        raise UnknownStream(f"{stream}: {exc}") from exc
    consumers_by_group: list[Any] = []
    if with_consumers and raw_groups:
        async with redis.pipeline(transaction=False) as pipe:
            for g in raw_groups:
                pipe.xinfo_consumers(stream, text(_get(g, "name")))
            consumers_by_group = await pipe.execute()
    groups: list[GroupInfo] = []
    for index, g in enumerate(raw_groups):
        last_delivered = text(_get(g, "last-delivered-id") or "")
        lag, present = lag_field(g)
        note = None
        if lag is None:
            lag, note = await counted_lag(redis, stream, last_delivered, reported=present)
        consumers = [
            ConsumerInfo(
                name=text(_get(c, "name")),
                pending=int(_get(c, "pending") or 0),
                idle_ms=int(_get(c, "idle") or 0),
                inactive_ms=_int_or_none(_get(c, "inactive")),
            )
            for c in (consumers_by_group[index] if consumers_by_group else [])
        ]
        groups.append(
            GroupInfo(
                name=text(_get(g, "name")),
                consumers=int(_get(g, "consumers") or 0),
                pending=int(_get(g, "pending") or 0),
                last_delivered_id=last_delivered,
                entries_read=_int_or_none(_get(g, "entries-read")),
                lag=lag,
                consumer_list=consumers,
                lag_note=note,
            )
        )
    return groups


def format_duration_ms(ms: int | None) -> str:
    """``1234`` -> ``1.2s``; ``None`` -> ``-``."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_groups_table(stream: str, groups: list[GroupInfo]) -> str:
    """A table a person can read: one line per group, consumers indented below it."""
    if not groups:
        return f"{stream}: no consumer groups"
    lines = [f"{'GROUP':<24} {'CONSUMERS':>9} {'PENDING':>8} {'LAG':>8}  LAST-DELIVERED"]
    for g in groups:
        lag = "unknown" if g.lag is None else str(g.lag) + ("*" if g.lag_note else "")
        lines.append(
            f"{g.name:<24} {g.consumers:>9} {g.pending:>8} {lag:>8}  {g.last_delivered_id}"
        )
        for c in g.consumer_list:
            inactive = format_duration_ms(c.inactive_ms)
            lines.append(
                f"  - {c.name:<40} pending={c.pending:<6} idle={format_duration_ms(c.idle_ms)}"
                f" inactive={inactive}"
            )
    notes = [f"* {g.name}: {g.lag_note}" for g in groups if g.lag_note]
    return "\n".join(lines + notes)
