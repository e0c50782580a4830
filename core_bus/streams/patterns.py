"""Redis glob patterns (as SCAN MATCH reads them) matched in Python, for discovery and tail.

Besides matching one name, :func:`globs_overlap` says whether two patterns can
match a common name (the supervisor's config checks: a pattern that can never
match a key of the namespace, two agents' patterns splitting one group).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core_bus.keys import StreamKeyBuilder

#: Characters that make a stream name a pattern.
GLOB_CHARS = frozenset("*?[")

#: A token of a glob: ``STAR`` or a regex matching exactly one character.
STAR = "*"


def is_pattern(name: str) -> bool:
    """True when ``name`` contains glob characters (``*``, ``?``, ``[``)."""
    return any(ch in GLOB_CHARS for ch in name)


def escape(name: str) -> str:
    """``name`` as a glob matching only itself."""
    return "".join("\\" + ch if ch in GLOB_CHARS or ch == "\\" else ch for ch in name)


def literal_prefix(pattern: str) -> str:
    """The characters every match starts with (up to the first glob character)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(pattern[i + 1])
            i += 2
            continue
        if ch in GLOB_CHARS:
            break
        out.append(ch)
        i += 1
    return "".join(out)


@lru_cache(maxsize=256)
def glob_tokens(pattern: str) -> tuple[str, ...]:
    """Redis' glob syntax (``*``, ``?``, ``[abc]``, ``[^a]``, ``[a-z]``, ``\\x``) as tokens."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(STAR)
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
    return tuple(out)


@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The glob as a compiled regex (whole-name match)."""
    return re.compile("".join(".*" if t == STAR else t for t in glob_tokens(pattern)), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """True when ``name`` matches the Redis glob ``pattern`` (as SCAN MATCH would)."""
    return glob_regex(pattern).fullmatch(name) is not None


def globs_overlap(a: str, b: str) -> bool:
    """True when some name matches both globs (a product automaton over the tokens).

    Character classes are compared on the patterns' own literal characters plus
    printable ASCII, which covers every key name a fleet writes.
    """
    ta, tb = glob_tokens(a), glob_tokens(b)
    alphabet = set(string.printable) | set(literal_prefix(a)) | set(literal_prefix(b))
    alphabet |= {ch for ch in a + b if ch not in GLOB_CHARS}
    matchers = {t: re.compile(t, re.DOTALL) for t in (*ta, *tb) if t != STAR}

    def closure(i: int, j: int) -> set[tuple[int, int]]:
        todo, seen = [(i, j)], set()
        while todo:
            state = todo.pop()
            if state in seen:
                continue
            seen.add(state)
            x, y = state
            if x < len(ta) and ta[x] == STAR:
                todo.append((x + 1, y))
            if y < len(tb) and tb[y] == STAR:
                todo.append((x, y + 1))
        return seen

    def step(tokens: tuple[str, ...], k: int, ch: str) -> int | None:
        if k >= len(tokens):
            return None
        if tokens[k] == STAR:
            return k
        return k + 1 if matchers[tokens[k]].fullmatch(ch) else None

    frontier = closure(0, 0)
    visited = set(frontier)
    while frontier:
        if any(x == len(ta) and y == len(tb) for x, y in frontier):
            return True
        nxt: set[tuple[int, int]] = set()
        for x, y in frontier:
            for ch in alphabet:
                nx, ny = step(ta, x, ch), step(tb, y, ch)
                if nx is not None and ny is not None:
                    nxt |= closure(nx, ny) - visited
        visited |= nxt
        frontier = nxt
    return False


def can_match_prefix(pattern: str, prefix: str) -> bool:
    """True when some name starting with ``prefix`` matches ``pattern``."""
    return globs_overlap(pattern, escape(prefix) + "*")


def pattern_problem(pattern: str, keys: StreamKeyBuilder) -> str | None:
    """Why ``pattern`` can never match a stream this fleet reads, or None."""
    prefix = f"{keys.ns}:"
    if not can_match_prefix(pattern, prefix):
        return (
            f"stream pattern {pattern!r} can never match a key of namespace {keys.ns!r} "
            f"(every key starts with {prefix!r})"
        )
    dead_letters = keys.dead_letter("")
    if literal_prefix(pattern).startswith(dead_letters):
        return (
            f"stream pattern {pattern!r} only matches dead-letter streams ({dead_letters}*), "
            "which are never read as inputs; use `ag1-bus dlq` for them"
        )
    return None
