"""The command stream contract: what a fleet command and its acknowledgement hold in Redis.

``keys.fleet_commands()`` (a stream, ``MAXLEN ~ 1000``) carries one entry per
command with the fields ``id`` (the command's own id, not the entry id),
``target`` (the supervisor that must run it), ``op`` (``restart``), ``agent``,
``rolling`` (``1``/``0``), ``issued_by`` and ``deadline_ms`` (Redis time after
which the target must not start it any more: a coordinator that gave up must
not see a late restart). ``keys.fleet_command_acks()`` (same limits) carries
one entry per command that a target handled: ``cmd`` (the command id),
``host``, ``ok`` (``1``/``0``), ``error``, ``ready`` (``"2/2"``: the agent's
ready/desired workers when it answered) and ``started_ms`` (Redis time when it
began). Every time here is Redis's (``TIME`` or an entry id), never a host clock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.replies import fields_of, text

OP_RESTART = "restart"
OPS = frozenset({OP_RESTART})
#: Approximate length both streams are trimmed to (``MAXLEN ~``).
STREAM_MAXLEN = 1000


@dataclass(frozen=True, slots=True)
class Command:
    """One command to one supervisor."""

    id: str
    target: str
    op: str
    agent: str
    rolling: bool
    issued_by: str
    deadline_ms: int = 0  # 0: no deadline
    entry_id: str = ""  # the stream entry's id once written or read

    def fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "target": self.target,
            "op": self.op,
            "agent": self.agent,
            "rolling": "1" if self.rolling else "0",
            "issued_by": self.issued_by,
            "deadline_ms": str(self.deadline_ms),
        }

    def as_json(self) -> dict[str, Any]:
        return {**self.fields(), "rolling": self.rolling, "entry_id": self.entry_id}


@dataclass(frozen=True, slots=True)
class Ack:
    """A target's answer to one command."""

    cmd: str
    host: str
    ok: bool
    error: str = ""
    ready: str = ""
    started_ms: int = 0
    entry_id: str = ""

    def fields(self) -> dict[str, str]:
        return {
            "cmd": self.cmd,
            "host": self.host,
            "ok": "1" if self.ok else "0",
            "error": self.error,
            "ready": self.ready,
            "started_ms": str(self.started_ms),
        }

    @property
    def acked_ms(self) -> int:
        """Redis time of the ack (from its entry id)."""
        return entry_ms(self.entry_id)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.fields(),
            "ok": self.ok,
            "started_ms": self.started_ms,
            "acked_ms": self.acked_ms,
            "entry_id": self.entry_id,
        }


def new_command_id() -> str:
    return uuid.uuid4().hex


def entry_ms(entry_id: str) -> int:
    """The millisecond part of a stream id (Redis time when it was added); 0 if none."""
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return 0


def _int(value: Any) -> int:
    try:
        return int(text(value))
    except (TypeError, ValueError):
        return 0


def command_of(entry_id: Any, raw: Any) -> Command | None:
    """Parse a command entry; None for a deleted or foreign entry."""
    f = fields_of(raw)
    if not f or "id" not in f or "target" not in f:
        return None
    return Command(
        id=text(f["id"]),
        target=text(f["target"]),
        op=text(f.get("op", "")),
        agent=text(f.get("agent", "")),
        rolling=text(f.get("rolling", "0")) == "1",
        issued_by=text(f.get("issued_by", "")),
        deadline_ms=_int(f.get("deadline_ms")),
        entry_id=text(entry_id),
    )


def ack_of(entry_id: Any, raw: Any) -> Ack | None:
    f = fields_of(raw)
    if not f or "cmd" not in f:
        return None
    return Ack(
        cmd=text(f["cmd"]),
        host=text(f.get("host", "")),
        ok=text(f.get("ok", "0")) == "1",
        error=text(f.get("error", "")),
        ready=text(f.get("ready", "")),
        started_ms=_int(f.get("started_ms")),
        entry_id=text(entry_id),
    )



async def last_entry_id(redis: Any, stream: str) -> str:
    """The id of the newest entry (``0-0`` for an empty stream): ``$`` made concrete,
    so nothing added between two blocking reads is missed."""
    rows = await redis.xrevrange(stream, count=1)
    return text(rows[0][0]) if rows else "0-0"


async def issue(redis: Any, keys: StreamKeyBuilder, command: Command) -> str:
    """XADD the command; returns its entry id."""
    entry = await redis.xadd(
        keys.fleet_commands(), command.fields(), maxlen=STREAM_MAXLEN, approximate=True
    )
    return text(entry)


async def acknowledge(redis: Any, keys: StreamKeyBuilder, ack: Ack) -> str:
    entry = await redis.xadd(
        keys.fleet_command_acks(), ack.fields(), maxlen=STREAM_MAXLEN, approximate=True
    )
    return text(entry)


async def recent(redis: Any, keys: StreamKeyBuilder, count: int = 10) -> list[dict[str, Any]]:
    """The ``count`` newest commands (newest first), each with its ack when there is one."""
    rows = await redis.xrevrange(keys.fleet_commands(), count=count)
    commands = [c for c in (command_of(i, f) for i, f in rows or ()) if c is not None]
    if not commands:
        return []
    oldest = min(commands, key=lambda c: entry_ms(c.entry_id)).entry_id
    acks: dict[str, Ack] = {}
    for entry_id, raw in await redis.xrange(keys.fleet_command_acks(), min=oldest) or ():
        ack = ack_of(entry_id, raw)
        if ack is not None:
            acks[ack.cmd] = ack
    out = []
    for command in commands:
        ack = acks.get(command.id)
        out.append({**command.as_json(), "ack": ack.as_json() if ack else None})
    return out
