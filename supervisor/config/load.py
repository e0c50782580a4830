"""Read ``fleet.toml``: TOML, environment overrides, validation, one-line errors.

:func:`load_config` either returns a fully resolved :class:`FleetConfig` or raises
:class:`ConfigError` listing *every* problem found, one line each::

    fleet.toml: agents[2].replicas: must be >= 0
    AG1_HTTP__LISTEN: http.listen: invalid listen address 'x': expected host:port, ...

Environment overrides: :mod:`supervisor.config.env`; cross-agent and
outside-world checks: :mod:`supervisor.config.checks`; message formatting:
:mod:`supervisor.config.errors`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from core_bus.keys import cluster_from_env
from supervisor.config.checks import check_agent_warnings, check_agents, check_fleet_size
from supervisor.config.env import apply_environment, reject_file_secrets, split_url_password
from supervisor.config.errors import ConfigError, Loc, Problems, did_you_mean, pydantic_message
from supervisor.config.models import (
    SECTION_MODELS,
    TOP_LEVEL_KEYS,
    AgentConfig,
    AgentDefaults,
    FleetConfig,
    HttpConfig,
    RedisConfig,
    SupervisorConfig,
)

__all__ = ["ConfigError", "load_config"]

M = TypeVar("M", bound=BaseModel)


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
    problems = Problems(label)
    config_dir = file_path.resolve().parent

    _check_structure(raw, problems)
    reject_file_secrets(raw, problems)
    apply_environment(raw, env, problems)
    split_url_password(raw, problems)
    _mode_from_environment(raw, env)

    context = {
        "config_dir": config_dir,
        "namespace": _namespace_of(raw),
        "cluster": _cluster_of(raw, env),
    }
    supervisor = _validate(SupervisorConfig, raw, ("supervisor",), context, problems)
    redis = _validate(RedisConfig, raw, ("redis",), context, problems)
    for mode_loc, mode_message in redis.mode_problems() if redis is not None else []:
        problems.add(mode_loc, mode_message)
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
    if supervisor is not None:
        for loc, message in check_fleet_size(agents, supervisor.max_workers):
            problems.add(loc, message)

    if problems.lines:
        raise ConfigError(problems.lines)
    warnings = Problems(label)
    for loc, message in check_agent_warnings(agents):
        warnings.add(loc, message)
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
        warnings=warnings.lines,
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
    except RecursionError:
        raise ConfigError([f"{label}: invalid TOML: nested too deeply"]) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "invalid TOML"
        match = _TOML_POS.match(message)
        if match:
            what, line, column = match.groups()
            message = f"line {line}, column {column}: invalid TOML: {what}"
        else:
            message = f"invalid TOML: {message}"
        raise ConfigError([f"{label}: {message}"]) from None


# -- structure and validation ------------------------------------------------------------


def _check_structure(raw: dict[str, Any], problems: Problems) -> None:
    """Unknown top-level keys, sections that are not tables, ``agents`` not an array."""
    for key in list(raw):
        if key not in TOP_LEVEL_KEYS:
            problems.add((key,), "unknown key" + did_you_mean(key, list(TOP_LEVEL_KEYS)))
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


def _mode_from_environment(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """``REDIS_MODE`` (core_bus's name) fills ``[redis] mode`` when the file leaves it out,
    so the supervisor connects in the mode its keys and its workers assume."""
    redis = raw.get("redis")
    if isinstance(redis, dict) and "mode" in redis:
        return
    mode = env.get("REDIS_MODE", "").strip().lower()
    if not mode or mode == "standalone":
        return
    if isinstance(redis, dict) and str(redis.get("url", "")).strip() == "embedded":
        return  # the embedded server is standalone whatever the shell says
    raw.setdefault("redis", {})["mode"] = mode


def _cluster_of(raw: dict[str, Any], env: Mapping[str, str]) -> bool:
    """``[redis] mode = "cluster"`` (or ``REDIS_MODE=cluster``): agents' keys get hash tags."""
    redis = raw.get("redis")
    mode = redis.get("mode") if isinstance(redis, dict) else None
    if isinstance(mode, str):
        return mode.strip().lower() == "cluster"
    return cluster_from_env(env)


def _namespace_of(raw: dict[str, Any]) -> str:
    redis = raw.get("redis")
    namespace = redis.get("namespace") if isinstance(redis, dict) else None
    return namespace if isinstance(namespace, str) and namespace else "AG1"


def _validate(
    model: type[M],
    raw: dict[str, Any],
    loc: Loc,
    context: dict[str, Any],
    problems: Problems,
) -> M | None:
    section = raw.get(str(loc[0]), {})
    return _validate_model(model, section, loc, context, problems)


def _validate_model(
    model: type[M],
    data: Any,
    loc: Loc,
    context: dict[str, Any],
    problems: Problems,
) -> M | None:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            error_loc = (*loc, *error["loc"])
            problems.add(error_loc, pydantic_message(model, error))
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
