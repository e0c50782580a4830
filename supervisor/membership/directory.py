"""Read the fleet's membership from Redis: who is a member, who is alive, who left.

The data model (written by :mod:`supervisor.membership.lease`, reclaimed by
:mod:`supervisor.membership.reclaim`; keys in :class:`core_bus.keys.StreamKeyBuilder`):

- ``fleet_members()`` hash: supervisor name -> JSON ``{"name", "incarnation",
  "host", "pid", "started_ms" (Redis time), "lease_ttl_ms", "http", "agents":
  {agent: {"workers", "ready", "consumers", "rolling"}}}``, rewritten at every
  renewal. A dead member stays until it was reclaimed; the reclaimer adds
  ``"pending_left": {agent: n}`` for entries no live supervisor could take.
- ``fleet_lease(name)`` string: the live incarnation, ``PX lease_ttl_ms``. A
  member whose lease key is gone is dead.
- ``fleet_departed()`` stream: ``name, incarnation, reason (left|expired),
  at_ms, reclaimed_by, reclaimed (JSON {agent: n}), pending_left (JSON {agent: n}), note``.

Read-only and cheap: one HGETALL plus one pipeline (GET + PTTL per member).
Any redis-py asyncio client works (RESP2/RESP3, decoded or not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.replies import fields_of, text

REASON_LEFT = "left"
REASON_EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class AgentPresence:
    """One agent as a member runs it."""

    workers: int = 0
    ready: int = 0
    consumers: tuple[str, ...] = ()
    rolling: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "ready": self.ready,
            "consumers": list(self.consumers),
            "rolling": self.rolling,
        }


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One member of the fleet as Redis holds it, with its lease's state.

    ``alive``: the lease key exists and holds this record's incarnation.
    ``heartbeat_age_ms``: ``lease_ttl_ms - PTTL`` (time since its last renewal,
    by Redis's clock); None when the lease is gone.
    ``pending_left``: entries of agents no live supervisor runs, left pending
    by a reclaim (the member stays listed until they are taken).
    """

    name: str
    incarnation: str
    host: str = ""
    pid: int = 0
    started_ms: int = 0
    lease_ttl_ms: int = 0
    http: str | None = None
    agents: dict[str, AgentPresence] = field(default_factory=dict)
    alive: bool = False
    lease_incarnation: str | None = None
    pttl_ms: int | None = None
    heartbeat_age_ms: int | None = None
    pending_left: dict[str, int] = field(default_factory=dict)
    #: it stopped gracefully but left entries pending (peers reclaim them like a death's)
    left: bool = False
    #: entries live peers reclaimed from it so far (agent -> n), and who did
    reclaimed: dict[str, int] = field(default_factory=dict)
    reclaimed_by: tuple[str, ...] = ()
    #: ``group`` and ``streams`` of each agent as it ran them (for pending counts)
    groups: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The record as status/JSON shows it (15b's fleet view)."""
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "host": self.host,
            "pid": self.pid,
            "started_ms": self.started_ms,
            "lease_ttl_ms": self.lease_ttl_ms,
            "http": self.http,
            "agents": {name: a.as_json() for name, a in self.agents.items()},
            "alive": self.alive,
            "heartbeat_age_ms": self.heartbeat_age_ms,
            "pending_left": dict(self.pending_left),
            "left": self.left,
            "reclaimed": dict(self.reclaimed),
            "reclaimed_by": list(self.reclaimed_by),
        }


@dataclass(frozen=True, slots=True)
class DepartedInfo:
    """One entry of the departed stream (newest first from :func:`departed`)."""

    id: str
    name: str
    incarnation: str
    reason: str
    at_ms: int
    reclaimed_by: str
    reclaimed: dict[str, int]
    pending_left: dict[str, int]
    note: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "incarnation": self.incarnation,
            "reason": self.reason,
            "at_ms": self.at_ms,
            "reclaimed_by": self.reclaimed_by,
            "reclaimed": dict(self.reclaimed),
            "pending_left": dict(self.pending_left),
            "note": self.note,
        }


def _counts(raw: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            try:
                out[str(key)] = int(value)
            except (TypeError, ValueError):
                continue
    return out


def _json(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(text(raw)) if raw is not None else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _agents(raw: Any) -> dict[str, AgentPresence]:
    out: dict[str, AgentPresence] = {}
    if not isinstance(raw, dict):
        return out
    for name, row in raw.items():
        if not isinstance(row, dict):
            continue
        consumers = row.get("consumers") or []
        out[str(name)] = AgentPresence(
            workers=int(row.get("workers") or 0),
            ready=int(row.get("ready") or 0),
            consumers=tuple(str(c) for c in consumers if isinstance(c, str)),
            rolling=bool(row.get("rolling")),
        )
    return out


def parse_member(name: str, raw: Any) -> dict[str, Any]:
    """The JSON record of one hash field (``{}`` when unreadable), name filled in."""
    record = _json(raw)
    record.setdefault("name", name)
    return record


def member_info(name: str, record: dict[str, Any], lease_value: Any, pttl: Any) -> MemberInfo:
    """Combine a hash record with its lease key's GET and PTTL replies."""
    incarnation = str(record.get("incarnation") or "")
    lease = None if lease_value is None or isinstance(lease_value, Exception) else text(lease_value)
    ttl_ms = int(record.get("lease_ttl_ms") or 0)
    remaining = pttl if isinstance(pttl, int) and pttl >= 0 else None
    alive = lease is not None and lease == incarnation
    http = record.get("http")
    return MemberInfo(
        name=name,
        incarnation=incarnation,
        host=str(record.get("host") or ""),
        pid=int(record.get("pid") or 0),
        started_ms=int(record.get("started_ms") or 0),
        lease_ttl_ms=ttl_ms,
        http=str(http) if http else None,
        agents=_agents(record.get("agents")),
        alive=alive,
        lease_incarnation=lease,
        pttl_ms=remaining,
        heartbeat_age_ms=max(0, ttl_ms - remaining) if alive and remaining is not None else None,
        pending_left=_counts(record.get("pending_left")),
        left=bool(record.get("left")),
        reclaimed=_counts(record.get("reclaimed")),
        reclaimed_by=tuple(str(b) for b in record.get("reclaimed_by") or () if b),
        groups=_groups(record.get("agents")),
    )


def _groups(raw: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    if isinstance(raw, dict):
        for name, row in raw.items():
            if isinstance(row, dict) and row.get("group"):
                streams = row.get("streams") or []
                out[str(name)] = (str(row["group"]), tuple(str(s) for s in streams))
    return out


async def members(redis: AsyncRedis, keys: StreamKeyBuilder) -> list[MemberInfo]:
    """Every member in the hash (alive or waiting to be reclaimed), sorted by name."""
    raw = await redis.hgetall(keys.fleet_members())
    records = {text(k): parse_member(text(k), v) for k, v in (raw or {}).items()}
    names = sorted(records)
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.get(keys.fleet_lease(name))
        pipe.pttl(keys.fleet_lease(name))
    replies = await pipe.execute(raise_on_error=False)
    return [
        member_info(name, records[name], replies[2 * i], replies[2 * i + 1])
        for i, name in enumerate(names)
    ]


async def live_members(redis: AsyncRedis, keys: StreamKeyBuilder) -> list[MemberInfo]:
    """Members whose lease holds their incarnation (heartbeat age = ttl - PTTL)."""
    return [m for m in await members(redis, keys) if m.alive]


async def dead_members(redis: AsyncRedis, keys: StreamKeyBuilder) -> list[MemberInfo]:
    """Members still in the hash whose lease key is gone (to reclaim, or with entries left)."""
    return [m for m in await members(redis, keys) if m.lease_incarnation is None]


def departed_info(entry_id: Any, raw_fields: Any) -> DepartedInfo:
    f = {k: text(v) for k, v in (fields_of(raw_fields) or {}).items()}
    try:
        at_ms = int(f.get("at_ms") or 0)
    except ValueError:
        at_ms = 0
    return DepartedInfo(
        id=text(entry_id),
        name=f.get("name", ""),
        incarnation=f.get("incarnation", ""),
        reason=f.get("reason", ""),
        at_ms=at_ms,
        reclaimed_by=f.get("reclaimed_by", ""),
        reclaimed=_counts(_json(f.get("reclaimed"))),
        pending_left=_counts(_json(f.get("pending_left"))),
        note=f.get("note", ""),
    )


async def departed(
    redis: AsyncRedis, keys: StreamKeyBuilder, count: int = 20
) -> list[DepartedInfo]:
    """The ``count`` newest entries of the departed stream, newest first."""
    rows = await redis.xrevrange(keys.fleet_departed(), count=count)
    return [departed_info(entry_id, raw) for entry_id, raw in rows or ()]


__all__ = [
    "REASON_EXPIRED",
    "REASON_LEFT",
    "AgentPresence",
    "DepartedInfo",
    "MemberInfo",
    "dead_members",
    "departed",
    "departed_info",
    "live_members",
    "member_info",
    "members",
    "parse_member",
]
