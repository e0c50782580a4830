"""Consumer groups of a stream: the one ``ensure_group``, and their state (XINFO).

The XINFO readers are read-only. ``lag`` may be NULL in Redis (a group created
at an arbitrary id, or entries deleted since): it is ``None`` here and shown as "unknown", never 0.
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
                last_delivered_id=text(_get(g, "last-delivered-id") or ""),
                entries_read=_int_or_none(_get(g, "entries-read")),
                lag=_int_or_none(_get(g, "lag")),
                consumer_list=consumers,
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
        lag = "unknown" if g.lag is None else str(g.lag)
        lines.append(
            f"{g.name:<24} {g.consumers:>9} {g.pending:>8} {lag:>8}  {g.last_delivered_id}"
        )
        for c in g.consumer_list:
            inactive = format_duration_ms(c.inactive_ms)
            lines.append(
                f"  - {c.name:<40} pending={c.pending:<6} idle={format_duration_ms(c.idle_ms)}"
                f" inactive={inactive}"
            )
    return "\n".join(lines)
