"""Normalise redis-py replies that differ between RESP2 and RESP3 and between
``decode_responses=True`` and ``False`` clients, so callers may pass any client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Fields = dict[str, Any]
Entry = tuple[str, Fields | None]


def text(value: Any) -> str:
    """bytes or str (or int) to str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def fields_of(raw: Any) -> Fields | None:
    """Entry fields as ``{str: raw value}``; ``None`` for a deleted entry (nil payload)."""
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return {text(k): v for k, v in raw.items()}
    items = list(raw)
    return {text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def entries_of(raw: Any) -> list[Entry]:
    """A list of ``(id, fields-or-None)`` from an XRANGE/XCLAIM/XREAD entry list.

    Items without an id (Redis 6.2 answers XCLAIM/XAUTOCLAIM of a deleted entry
    with nil) are skipped; an id with a nil payload (a deleted entry read from
    the pending history) is kept as ``(id, None)``.
    """
    out: list[Entry] = []
    for item in raw or ():
        if item is None or not item or item[0] is None:
            continue
        entry_id, payload = item[0], item[1] if len(item) > 1 else None
        out.append((text(entry_id), fields_of(payload)))
    return out


def stream_pairs(reply: Any) -> list[tuple[Any, list[Any]]]:
    """XREAD/XREADGROUP reply as raw ``[(stream, [(id, fields), ...])]``, RESP2 or RESP3.

    RESP3 replies are a mapping whose entry lists redis-py 8 wraps in one more
    list (``{stream: [[(id, fields), ...]]}``, ``{stream: [[]]}`` when empty);
    RESP2 replies are a list of pairs. Values are left raw for hot paths.
    """
    if not reply:
        return []
    pairs = list(reply.items()) if isinstance(reply, Mapping) else list(reply)
    out: list[tuple[Any, list[Any]]] = []
    for stream, entries in pairs:
        if (
            entries
            and len(entries) == 1
            and isinstance(entries[0], list)
            and (not entries[0] or isinstance(entries[0][0], list | tuple))
        ):
            entries = entries[0]
        out.append((stream, list(entries or ())))
    return out


def streams_of(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD/XREADGROUP reply as ``[(stream, entries)]`` with text ids and field names."""
    return [(text(stream), entries_of(raw)) for stream, raw in stream_pairs(reply)]


def autoclaim_of(reply: Any) -> tuple[str, list[Entry], list[str]]:
    """XAUTOCLAIM reply as ``(next cursor, claimed entries, deleted ids)``.

    Redis >= 7 returns a third element: ids that were pending but whose entries
    no longer exist (trimmed or XDELed); Redis 6.2 does not.
    """
    cursor = text(reply[0])
    claimed = entries_of(reply[1])
    deleted = [text(i) for i in reply[2]] if len(reply) > 2 and reply[2] else []
    return cursor, claimed, deleted
