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


def streams_of(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD/XREADGROUP reply as ``[(stream, entries)]`` for RESP2 (list) and RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        pairs: list[tuple[Any, Any]] = list(reply.items())
    else:
        pairs = [(item[0], item[1]) for item in reply]
    result: list[tuple[str, list[Entry]]] = []
    for stream, raw_entries in pairs:
        # RESP3 may wrap the entries in another list level
        if (
            raw_entries
            and isinstance(raw_entries, list)
            and len(raw_entries) == 1
            and (
                isinstance(raw_entries[0], list)
                and raw_entries[0]
                and isinstance(raw_entries[0][0], list)
            )
        ):
            raw_entries = raw_entries[0]
        result.append((text(stream), entries_of(raw_entries)))
    return result


def autoclaim_of(reply: Any) -> tuple[str, list[Entry], list[str]]:
    """XAUTOCLAIM reply as ``(next cursor, claimed entries, deleted ids)``.

    Redis >= 7 returns a third element: ids that were pending but whose entries
    no longer exist (trimmed or XDELed); Redis 6.2 does not.
    """
    cursor = text(reply[0])
    claimed = entries_of(reply[1])
    deleted = [text(i) for i in reply[2]] if len(reply) > 2 and reply[2] else []
    return cursor, claimed, deleted
