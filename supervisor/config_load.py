"""Read ``fleet.toml``: TOML, environment overrides, validation, one-line errors.

:func:`load_config` either returns a fully resolved :class:`FleetConfig` or raises
:class:`ConfigError` listing *every* problem found, one line each::

    fleet.toml: agents[2].replicas: must be >= 0
    AG1_HTTP__LISTEN: http.listen: invalid listen address 'x': expected host:port, ...

Environment overrides follow pydantic-settings conventions (``AG1_`` prefix,
``__`` nesting, case-insensitive), implemented here so every error can name the
variable it came from and agents can be addressed by name:
``AG1_AGENTS__<NAME>__<KEY>`` (name upper-cased, ``-`` written as ``_``). Values
starting with ``[`` or ``{`` are parsed as JSON (lists, tables).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError

from supervisor.config import (
    SECRET_FIELDS,
    SECTION_MODELS,
    AgentConfig,
    AgentDefaults,
    FleetConfig,
    HttpConfig,
    RedisConfig,
    SupervisorConfig,
)
from supervisor.config_checks import check_agents

ENV_PREFIX = "AG1_"
ENV_SEP = "__"
TOP_LEVEL_KEYS = (*SECTION_MODELS, "agents")

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """An invalid or unreadable fleet.toml; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Problems:
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


# -- public entry point ------------------------------------------------------------------


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    check_imports: bool = True,
) -> FleetConfig:
    """Load, override from ``environ`` (default ``os.environ``), validate and resolve.

    With ``check_imports`` each handler is imported in a subprocess (its
    working_dir on ``sys.path``, its env applied) to prove it exists and is an
    async callable; the calling process is never polluted by agent code.

    :raises ConfigError: listing every problem, one line each; never anything else
        for bad input.
    """
    label = str(path)
    file_path = Path(path)
    data = _read(file_path, label)
    raw = _parse_toml(data, label)
    env = os.environ if environ is None else environ
    problems = _Problems(label)
    config_dir = file_path.resolve().parent

    _check_structure(raw, problems)
    _reject_file_secrets(raw, problems)
    _apply_environment(raw, env, problems)
    _split_url_password(raw, problems)

    context = {"config_dir": config_dir, "namespace": _namespace_of(raw)}
    supervisor = _validate(SupervisorConfig, raw, ("supervisor",), context, problems)
    redis = _validate(RedisConfig, raw, ("redis",), context, problems)
    http = _validate(HttpConfig, raw, ("http",), context, problems)
    defaults = _validate(AgentDefaults, raw, ("defaults",), context, problems)
    usable_defaults = defaults or _salvage(AgentDefaults, raw.get("defaults", {}), context)
    inherited = (
        {key: getattr(usable_defaults, key) for key in usable_defaults.model_fields_set}
        if usable_defaults
        else {}
    )
    raw_agents = raw.get("agents", [])
    agents: dict[int, AgentConfig] = {}
    for index, raw_agent in enumerate(raw_agents):
        if not isinstance(raw_agent, dict):
            continue
        merged = {**inherited, **raw_agent}
        if isinstance(raw_agent.get("env"), dict) and "env" in inherited:
            merged["env"] = {**inherited["env"], **raw_agent["env"]}
        agent = _validate_model(AgentConfig, merged, ("agents", index), context, problems)
        if agent is None:
            agent = _salvage(AgentConfig, merged, context, vital={"name", "handler", "command"})
        if agent is not None:
            agents[index] = agent

    known_names = {a.get("name") for a in raw_agents if isinstance(a, dict)}
    for loc, message in check_agents(
        agents, {n for n in known_names if isinstance(n, str)}, check_imports=check_imports
    ):
        problems.add(loc, message)

    if problems.lines:
        raise ConfigError(problems.lines)
    assert supervisor is not None and redis is not None and http is not None
    assert defaults is not None
    resolved = [
        agent
        if agent.sweep_interval is not None
        else agent.model_copy(update={"sweep_interval": supervisor.sweep_interval})
        for _, agent in sorted(agents.items())
    ]
    return FleetConfig(
        path=file_path,
        config_dir=config_dir,
        hash=hashlib.sha256(data).hexdigest(),
        supervisor=supervisor,
        redis=redis,
        http=http,
        defaults=defaults,
        agents=resolved,
    )


# -- reading -------------------------------------------------------------------------------


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{label}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{label}: is a directory, expected a TOML file"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read: {exc.strerror or exc}"]) from None


_TOML_POS = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")


def _parse_toml(data: bytes, label: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid TOML"
        match = _TOML_POS.match(message)
        if match:
            what, line, column = match.groups()
            message = f"line {line}, column {column}: invalid TOML: {what}"
        else:
            message = f"invalid TOML: {message}"
        raise ConfigError([f"{label}: {message}"]) from None


# -- structure and secrets -------------------------------------------------------------------


def _did_you_mean(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_structure(raw: dict[str, Any], problems: _Problems) -> None:
    """Unknown top-level keys, sections that are not tables, ``agents`` not an array."""
    for key in list(raw):
        if key not in TOP_LEVEL_KEYS:
            problems.add((key,), "unknown key" + _did_you_mean(key, list(TOP_LEVEL_KEYS)))
            del raw[key]
    for section in SECTION_MODELS:
        value = raw.get(section)
        if value is not None and not isinstance(value, dict):
            problems.add((section,), f"must be a table ([{section}])")
            del raw[section]
    agents = raw.get("agents")
    if agents is None:
        return
    if not isinstance(agents, list):
        problems.add(("agents",), "must be an array of tables ([[agents]])")
        raw["agents"] = []
        return
    for index, item in enumerate(agents):
        if not isinstance(item, dict):
            problems.add(("agents", index), "must be a table ([[agents]])")


def _reject_file_secrets(raw: dict[str, Any], problems: _Problems) -> None:
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
            has_password = urlsplit(redis["url"]).password is not None
        except ValueError:
            has_password = False
        if has_password:
            problems.add(
                ("redis", "url"),
                "contains a password; remove it and set AG1_REDIS__PASSWORD or "
                "REDIS_PASSWORD in the environment",
            )
            del redis["url"]


def _split_url_password(raw: dict[str, Any], problems: _Problems) -> None:
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
        from urllib.parse import unquote

        redis["password"] = unquote(password)
        origin = problems.origins.get(("redis", "url"))
        if origin is not None:
            problems.origins[("redis", "password")] = origin


# -- environment overrides -------------------------------------------------------------------


def env_name_for_agent(name: str) -> str:
    """How an agent name is written in ``AG1_AGENTS__<NAME>__...`` variables."""
    return name.upper().replace("-", "_")


def _env_value(raw_value: str) -> Any:
    stripped = raw_value.strip()
    if stripped[:1] in ("[", "{"):
        return json.loads(stripped)
    return raw_value


def _apply_environment(
    raw: dict[str, Any], environ: Mapping[str, str], problems: _Problems
) -> None:
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
    raw: dict[str, Any], environ: Mapping[str, str], problems: _Problems
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


def _namespace_of(raw: dict[str, Any]) -> str:
    redis = raw.get("redis")
    namespace = redis.get("namespace") if isinstance(redis, dict) else None
    return namespace if isinstance(namespace, str) and namespace else "AG1"


# -- validation and error formatting -----------------------------------------------------------


def _validate(
    model: type[M],
    raw: dict[str, Any],
    loc: Loc,
    context: dict[str, Any],
    problems: _Problems,
) -> M | None:
    section = raw.get(str(loc[0]), {})
    return _validate_model(model, section, loc, context, problems)


def _validate_model(
    model: type[M],
    data: Any,
    loc: Loc,
    context: dict[str, Any],
    problems: _Problems,
) -> M | None:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            error_loc = (*loc, *error["loc"])
            problems.add(error_loc, _message(model, error))
        return None


def _salvage(
    model: type[M],
    data: Any,
    context: dict[str, Any],
    vital: frozenset[str] | set[str] = frozenset(),
) -> M | None:
    """``data`` minus its invalid keys, so later checks still run on the rest.

    Its own errors are already reported; a second failure is silent. None when
    a ``vital`` key is invalid (checks on the remainder would mislead).
    """
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        if not bad or bad & vital:
            return None
        data = {k: v for k, v in data.items() if k not in bad}
    try:
        return model.model_validate(data, context=context)
    except ValidationError:
        return None


def _fmt_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(model: type[BaseModel], error: Any) -> str:
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
    if kind in simple:
        return simple[kind]
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {_fmt_input(given)})"
    if kind == "too_short":
        return "must not be empty"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _unknown_key_message(model: type[BaseModel], key: str) -> str:
    fields = list(model.model_fields)
    if model is AgentDefaults and key in AgentConfig.model_fields:
        return "only valid in [[agents]], not in [defaults]"
    return "unknown key" + _did_you_mean(key, fields)
