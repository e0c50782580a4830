"""One-line config problems: where they are, what is wrong, in file order.

A problem's location is a tuple path into the raw config (``("agents", 2,
"replicas")``); it is printed as ``agents[2].replicas`` after the file name, or
after the environment variable the value came from.
"""

from __future__ import annotations

import difflib
import json
import shlex
from typing import Any

from pydantic import BaseModel

from supervisor.config.models import TOP_LEVEL_KEYS, AgentConfig, AgentDefaults

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """An invalid or unreadable fleet.toml; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Problems:
    """Collects problems, naming the env var when a value came from the environment."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.entries: list[tuple[tuple[int, int], str]] = []
        self.origins: dict[Loc, str] = {}

    @property
    def lines(self) -> list[str]:
        """Problems in file order: sections, then agents by index (stable within)."""
        return [line for _, line in sorted(self.entries, key=lambda entry: entry[0])]

    def source(self, loc: Loc) -> str:
        for end in range(len(loc), 0, -1):
            origin = self.origins.get(loc[:end])
            if origin is not None:
                return origin
        return self.label

    def add(self, loc: Loc, message: str) -> None:
        where = dotted(loc)
        prefix = f"{self.source(loc)}: {where}: " if where else f"{self.source(loc)}: "
        line = prefix + message
        if all(line != existing for _, existing in self.entries):
            self.entries.append((_order(loc), line))

    def add_raw(self, line: str) -> None:
        self.entries.append(((-1, -1), line))


def _order(loc: Loc) -> tuple[int, int]:
    section = str(loc[0]) if loc else ""
    rank = TOP_LEVEL_KEYS.index(section) if section in TOP_LEVEL_KEYS else -1
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
    return rank, index


def dotted(loc: Loc) -> str:
    """``("agents", 2, "replicas")`` -> ``"agents[2].replicas"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def did_you_mean(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _fmt_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pydantic_message(model: type[BaseModel], error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = error.get("input")
    field = str(error["loc"][-1]) if error["loc"] else ""
    if field in ("password", "token"):
        given = "***"
    if kind == "extra_forbidden":
        return _unknown_key_message(model, field)
    simple = {
        "missing": "required",
        "list_type": f"must be a list (got {_fmt_input(given)})",
        "dict_type": f"must be a table (got {_fmt_input(given)})",
        "model_type": f"must be a table (got {_fmt_input(given)})",
        "string_type": f"must be a string (got {_fmt_input(given)})",
        "path_type": f"must be a path string (got {_fmt_input(given)})",
        "int_type": f"must be an integer (got {_fmt_input(given)})",
        "int_parsing": f"must be an integer (got {_fmt_input(given)})",
        "int_from_float": f"must be an integer (got {_fmt_input(given)})",
        "bool_type": f"must be true or false (got {_fmt_input(given)})",
        "bool_parsing": f"must be true or false (got {_fmt_input(given)})",
    }
    if kind == "list_type" and isinstance(given, str):
        return f"must be a list (got {_fmt_input(given)}; write {_as_toml_list(field, given)})"
    if kind in simple:
        return simple[kind]
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "less_than_equal":
        limit = ctx.get("le")
        return f"must be <= {limit:g}" if isinstance(limit, float) else f"must be <= {limit}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {_fmt_input(given)})"
    if kind == "too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"is too long: at most {ctx.get('max_length')} characters"
    if kind == "too_long":
        return f"has too many items: at most {ctx.get('max_length')}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _as_toml_list(field: str, text: str) -> str:
    """How the user probably meant a string given where a list is expected."""
    if field == "command":
        try:
            return json.dumps(shlex.split(text))
        except ValueError:
            pass
    return json.dumps([text])


def _unknown_key_message(model: type[BaseModel], key: str) -> str:
    fields = list(model.model_fields)
    if model is AgentDefaults and key in AgentConfig.model_fields:
        return "only valid in [[agents]], not in [defaults]"
    return "unknown key" + did_you_mean(key, fields)
