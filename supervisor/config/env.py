"""Environment overrides and secrets for fleet.toml.

Overrides follow pydantic-settings conventions (``AG1_`` prefix, ``__``
nesting, case-insensitive), implemented here so every error can name the
variable a value came from and agents can be addressed by name:
``AG1_AGENTS__<NAME>__<KEY>`` (name upper-cased, ``-`` written as ``_``). Values
starting with ``[`` or ``{`` are parsed as JSON (lists, tables).

Secrets (Redis password, control token) are refused in the file and read only
from the environment (:data:`supervisor.config.models.SECRET_FIELDS`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from supervisor.config.errors import Loc, Problems
from supervisor.config.models import SECRET_FIELDS, TOP_LEVEL_KEYS

ENV_PREFIX = "AG1_"
ENV_SEP = "__"


def reject_file_secrets(raw: dict[str, Any], problems: Problems) -> None:
    """Report (and drop) secrets written in the file: secret keys, passwords inside URLs."""
    for section, fields in SECRET_FIELDS.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for field, env_names in fields.items():
            if field in table:
                del table[field]
                problems.add(
                    (section, field),
                    "secrets are not allowed in the file; set "
                    + " or ".join(env_names)
                    + " in the environment",
                )
    redis = raw.get("redis")
    if isinstance(redis, dict) and isinstance(redis.get("url"), str):
        try:
            parts = urlsplit(redis["url"])
            has_password = parts.password is not None or "password" in parse_qs(parts.query)
        except ValueError:
            has_password = False
        if has_password:
            problems.add(
                ("redis", "url"),
                "contains a password; remove it and set AG1_REDIS__PASSWORD or "
                "REDIS_PASSWORD in the environment",
            )
            del redis["url"]


def split_url_password(raw: dict[str, Any], problems: Problems) -> None:
    """A password inside an env-provided URL moves to ``password`` so reprs never show it."""
    redis = raw.get("redis")
    if not isinstance(redis, dict) or not isinstance(redis.get("url"), str):
        return
    try:
        parts = urlsplit(redis["url"])
        password = parts.password
    except ValueError:
        return
    if password is None:
        return
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}@{host}" if parts.username else host
    redis["url"] = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    if "password" not in redis:
        redis["password"] = unquote(password)
        origin = problems.origins.get(("redis", "url"))
        if origin is not None:
            problems.origins[("redis", "password")] = origin


def env_name_for_agent(name: str) -> str:
    """How an agent name is written in ``AG1_AGENTS__<NAME>__...`` variables."""
    return name.upper().replace("-", "_")


def _env_value(raw_value: str) -> Any:
    stripped = raw_value.strip()
    if stripped[:1] in ("[", "{"):
        return json.loads(stripped)
    return raw_value


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str], problems: Problems) -> None:
    """Write ``AG1_*`` overrides into ``raw``, remembering where each value came from."""
    agents = raw.get("agents", [])
    by_env_name: dict[str, list[int]] = {}
    for index, agent in enumerate(agents):
        if isinstance(agent, dict) and isinstance(agent.get("name"), str):
            by_env_name.setdefault(env_name_for_agent(agent["name"]), []).append(index)

    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].split(ENV_SEP)
        section = parts[0].lower()
        if section not in TOP_LEVEL_KEYS or len(parts) < 2 or not all(parts):
            continue  # AG1_CONFIG, AG1_AGENT, ... belong to others
        try:
            value = _env_value(environ[var])
        except json.JSONDecodeError as exc:
            problems.add_raw(f"{var}: invalid JSON value: {exc.msg} at column {exc.colno}")
            continue
        except (RecursionError, ValueError) as exc:  # nested too deeply, a 5,000-digit int
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
            problems.add_raw(f"{var}: invalid JSON value: {reason}")
            continue
        loc: Loc
        if section == "agents":
            if len(parts) < 3:
                continue
            indexes = by_env_name.get(parts[1].upper(), [])
            if len(indexes) != 1:
                names = ", ".join(sorted(by_env_name)) or "none"
                what = "no agent" if not indexes else "more than one agent"
                problems.add_raw(
                    f"{var}: {what} matches {parts[1]!r} (agents, as written in variables: {names})"
                )
                continue
            loc = ("agents", indexes[0], *_env_keys(parts[2:]))
        else:
            loc = (section, *_env_keys(parts[1:]))
        _set_path(raw, loc, value)
        problems.origins[loc] = var

    _apply_secret_fallbacks(raw, environ, problems)


def _apply_secret_fallbacks(
    raw: dict[str, Any], environ: Mapping[str, str], problems: Problems
) -> None:
    """Secrets not set via ``AG1_<SECTION>__<FIELD>`` come from their fallback variables."""
    for section, fields in SECRET_FIELDS.items():
        for field, names in fields.items():
            var = next((name for name in names[1:] if environ.get(name)), None)
            table = raw.setdefault(section, {})
            if var is None or not isinstance(table, dict) or field in table:
                continue
            table[field] = environ[var]
            problems.origins[(section, field)] = var


def _env_keys(parts: list[str]) -> list[str]:
    """Field names are case-insensitive; names under ``env`` keep their case."""
    out: list[str] = []
    for part in parts:
        out.append(part if out and out[-1] == "env" else part.lower())
    return out


def _set_path(raw: dict[str, Any], loc: Loc, value: Any) -> None:
    node: Any = raw
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part]
            continue
        child = node.get(part)
        if not isinstance(child, dict | list):
            child = {}
            node[part] = child
        node = child
    node[loc[-1]] = value
