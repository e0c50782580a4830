"""Watch streams without disturbing them: backlog, then live entries, via XREAD only.

No consumer group is created and nothing is acked (the prototype's tail created
a group and consumed what it showed). Names with glob characters are patterns:
matching streams are found with SCAN, and new ones are picked up from the
discovery notices ``publish_envelope`` writes, plus a periodic re-SCAN for
streams created by plain XADD. Malformed entries are shown as such.

``python -m core_bus.tail STREAM...`` (see :mod:`core_bus.tail`) is ``ag1-bus tail STREAM...``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.envelope import Envelope
from core_bus.errors import BusError
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import ALT_DATA_FIELD, DATA_FIELD
from core_bus.settings import get_settings
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.patterns import glob_match, is_pattern
from core_bus.streams.replies import Fields, fields_of, streams_of, text
from core_bus.streams.slots import read_slots, slot_groups
from core_bus.streams.slots import xread as slot_xread

READ_COUNT = 500
BLOCK_SECONDS = 1.0
RESCAN_SECONDS = 5.0
PREVIEW_CHARS = 80
RETRY_SECONDS = 1.0


class TailError(BusError):
    """A name given to tail cannot be tailed (it exists but is not a stream)."""


@dataclass
class TailOptions:
    """What to show: ``last`` entries of backlog (``None`` = all of it), at most ``count``."""

    names: list[str]
    last: int | None = 10
    count: int | None = None
    as_json: bool = False
    full: bool = False  # the whole content, not a preview cut at PREVIEW_CHARS


# -- formatting -------------------------------------------------------------------


def entry_time(entry_id: str) -> str:
    """The time Redis stamped into an entry id, as UTC ISO-8601 with milliseconds."""
    try:
        ms = int(entry_id.split("-", 1)[0])
    except ValueError:
        return "?"
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _preview(value: Any, limit: int | None = PREVIEW_CHARS) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
    else:
        shown = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if limit is not None and len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


def parse_entry(fields: Fields | None) -> tuple[Envelope | None, str | None]:
    """``(envelope, None)`` or ``(None, why it is malformed)``."""
    if fields is None:
        return None, "deleted entry"
    raw = fields.get(DATA_FIELD, fields.get(ALT_DATA_FIELD))
    if raw is None:
        return None, "no data field"
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid utf-8"
    try:
        json.loads(raw)
    except ValueError:
        return None, "invalid json"
    try:
        return Envelope.from_json(raw), None
    except ValueError:
        return None, "not an envelope"


def _trace(env: Envelope, hops: int = 3) -> str:
    names = [hop.rsplit(":", 1)[0] for hop in env.trace[-hops:]]
    more = "…>" if len(env.trace) > hops else ""
    return more + ">".join(names)


def _extra_fields(fields: Fields) -> str:
    """Fields besides the payload, e.g. the reason of a dead letter."""
    shown = [
        f"{name}={_preview(value, 40)}"
        for name, value in fields.items()
        if name not in (DATA_FIELD, ALT_DATA_FIELD)
        and name in ("reason", "source_stream", "deliveries")
    ]
    return (" | " + " ".join(shown)) if shown else ""


def format_entry(
    stream: str, entry_id: str, fields: Fields | None, *, show_stream: bool, full: bool = False
) -> str:
    """One line a person can scan: time, [stream,] id, role, agent, cid, content, trace
    (content cut at PREVIEW_CHARS unless ``full``)."""
    limit = None if full else PREVIEW_CHARS
    head = f"{entry_time(entry_id)} " + (f"{stream} " if show_stream else "") + entry_id
    env, problem = parse_entry(fields)
    if env is None:
        if fields is None:
            return f"{head} MALFORMED({problem})"
        raw = fields.get(DATA_FIELD, fields.get(ALT_DATA_FIELD))
        if raw is not None:
            return f"{head} MALFORMED({problem}) {_preview(raw, limit)}"
        listed = " ".join(f"{k}={_preview(v, 40)}" for k, v in fields.items())
        return f"{head} MALFORMED({problem}) {listed}"
    cid = (env.correlation_id or "-")[:8]
    line = f"{head} {env.role:<9} agent={env.agent_name or '-'} cid={cid} "
    line += _preview(env.content, limit)
    if env.trace:
        line += f" trace={_trace(env)}"
    if fields is not None:
        line += _extra_fields(fields)
    return line


def entry_json(stream: str, entry_id: str, fields: Fields | None) -> str:
    """One JSON object per entry: the envelope, or ``malformed`` with the raw fields."""
    obj: dict[str, Any] = {"stream": stream, "id": entry_id, "time": entry_time(entry_id)}
    env, problem = parse_entry(fields)
    if env is not None:
        obj["envelope"] = env.to_dict()
    else:
        obj["malformed"] = problem
        obj["fields"] = {k: text(v) for k, v in (fields or {}).items()}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


# -- reading ----------------------------------------------------------------------


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


class Tailer:
    """Reads the backlog and then live entries of the streams matching ``options.names``."""

    def __init__(
        self,
        redis: AsyncRedis,
        options: TailOptions,
        emit: Callable[[str], None],
        flush: Callable[[], None] | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.options = options
        self.emit = emit
        self.flush = flush or (lambda: None)
        self.notify = notify or (lambda _message: None)
        self.keys = StreamKeyBuilder(get_settings().bus_namespace)
        self.patterns = [n for n in options.names if is_pattern(n)]
        self.positions: dict[str, str] = {}
        self.shown = 0
        self.show_stream = bool(self.patterns) or len(options.names) > 1
        self.notices_position = "0-0"

    @property
    def done(self) -> bool:
        return self.options.count is not None and self.shown >= self.options.count

    def _show(self, stream: str, entry_id: str, fields: Fields | None) -> None:
        if self.done:
            return
        if self.options.as_json:
            self.emit(entry_json(stream, entry_id, fields))
        else:
            self.emit(
                format_entry(
                    stream, entry_id, fields, show_stream=self.show_stream, full=self.options.full
                )
            )
        self.shown += 1

    async def _scan(self, pattern: str) -> list[str]:
        found: list[str] = []
        async for key in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            found.append(text(key))
        return sorted(found)

    async def _check_literal(self, stream: str) -> None:
        kind = text(await self.redis.type(stream))
        if kind not in ("stream", "none"):
            raise TailError(f"{stream} is a {kind}, not a stream")

    async def start(self) -> list[str]:
        """Find the streams, show the backlog, fix the live read positions.

        Returns the literal names that do not exist yet (they are watched anyway).
        """
        if self.patterns:
            newest = await self.redis.xrevrange(self.keys.discovery_stream(), count=1)
            self.notices_position = text(newest[0][0]) if newest else "0-0"
        missing: list[str] = []
        streams: list[str] = []
        for name in self.options.names:
            if is_pattern(name):
                streams.extend(await self._scan(name))
            else:
                await self._check_literal(name)
                if not await self.redis.exists(name):
                    missing.append(name)
                streams.append(name)
        for stream in dict.fromkeys(streams):
            self.positions[stream] = "0-0"
        if self.options.last is not None:
            await self._show_last(self.options.last)
        return missing

    async def _show_last(self, last: int) -> None:
        backlog: list[tuple[str, str, Fields | None]] = []
        for stream in self.positions:
            newest = await self.redis.xrevrange(stream, count=max(last, 1))
            entries = [(text(i), f) for i, f in newest or ()]
            if entries:
                self.positions[stream] = entries[0][0]
            backlog.extend((stream, i, fields_of(f)) for i, f in entries[:last])
        backlog.sort(key=lambda item: _id_key(item[1]))
        for stream, entry_id, fields in backlog[-last:] if last else []:
            self._show(stream, entry_id, fields)

    def _matches(self, stream: str) -> bool:
        return any(glob_match(p, stream) for p in self.patterns)

    def _adopt(self, stream: str) -> None:
        if stream not in self.positions and self._matches(stream):
            self.positions[stream] = "0-0"

    async def read_once(self) -> None:
        """One XREAD over every stream (and the discovery notices when following patterns);
        on Redis Cluster one per slot."""
        query = dict(self.positions)
        notices = self.keys.discovery_stream()
        if self.patterns and notices not in query:
            query[notices] = self.notices_position
        if not query:
            await anyio.sleep(BLOCK_SECONDS)
            return
        block = blocking_ms(self.redis, BLOCK_SECONDS)

        async def read(spec: dict[Any, Any], block_ms: int) -> Any:
            reply = await slot_xread(self.redis, spec, READ_COUNT, block_ms)
            for stream, entries in streams_of(reply):
                if entries:  # a lane reads on from where its last reply ended
                    spec[stream] = entries[-1][0]
            return reply

        specs = [{s: query[s] for s in group} for group in slot_groups(self.redis, list(query))]
        if len(specs) == 1:
            self._take(await read(specs[0], block), notices)
        else:  # Redis Cluster: one XREAD lane per slot
            await read_slots(specs, read, lambda reply: self._take(reply, notices), block)

    def _take(self, reply: Any, notices: str) -> None:
        """Show one XREAD reply's entries; adopt streams named by discovery notices."""
        for stream, entries in streams_of(reply):
            if not entries:
                continue
            if stream == notices and self.patterns:
                self.notices_position = entries[-1][0]
                for _id, fields in entries:
                    if fields is not None and "stream" in fields:
                        self._adopt(text(fields["stream"]))
                if stream not in self.positions:
                    continue
            self.positions[stream] = entries[-1][0]
            for entry_id, fields in entries:
                self._show(stream, entry_id, fields)

    async def rescan(self) -> None:
        for pattern in self.patterns:
            for stream in await self._scan(pattern):
                self._adopt(stream)

    async def follow(self) -> None:
        """Live entries until ``count`` entries were shown in all (forever without one).

        Losing Redis is reported through ``notify`` and retried; nothing is skipped.
        """
        next_scan = anyio.current_time() + RESCAN_SECONDS
        lost = False
        while not self.done:
            try:
                await self.read_once()
            except TRANSIENT_ERRORS as exc:
                # keep our positions and resume where we were once Redis is back
                if not lost:
                    self.notify(f"lost the Redis connection ({exc}); retrying")
                    lost = True
                await anyio.sleep(RETRY_SECONDS)
                continue
            if lost:
                self.notify("reconnected")
                lost = False
            self.flush()
            if self.patterns and anyio.current_time() >= next_scan:
                await self.rescan()
                next_scan = anyio.current_time() + RESCAN_SECONDS

    async def run(self) -> None:
        """Backlog, then live entries."""
        await self.start()
        self.flush()
        await self.follow()
