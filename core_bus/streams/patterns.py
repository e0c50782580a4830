"""Redis glob patterns (as SCAN MATCH reads them) matched in Python, for discovery and tail."""

from __future__ import annotations

import re
from functools import lru_cache

#: Characters that make a stream name a pattern.
GLOB_CHARS = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """True when ``name`` contains glob characters (``*``, ``?``, ``[``)."""
    return any(ch in GLOB_CHARS for ch in name)


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Redis' glob syntax (``*``, ``?``, ``[abc]``, ``[^a]``, ``[a-z]``, ``\\x``) as a regex."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[{'^' if negate else ''}{body}]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """True when ``name`` matches the Redis glob ``pattern`` (as SCAN MATCH would)."""
    return glob_regex(pattern).fullmatch(name) is not None
