"""Live reload: load and validate the config file, then apply the plan difference.

An invalid file is rejected and the old plan keeps running. A valid one is
diffed (:meth:`supervisor.config.plan.Plan.diff`): unchanged agents keep their pids,
``replicas``-only changes scale, changed agents are rolled
(:mod:`supervisor.fleet.rollout`), added agents start and removed ones drain and stop.
``[supervisor]``, ``[redis]`` and ``[http]`` stay as the running supervisor
started with them; when they differ (secrets included) the result says which
need a restart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from pydantic import SecretStr

from core_bus.log import get_logger
from supervisor.config.models import FleetConfig
from supervisor.config.plan import build_plan
from supervisor.fleet.rollout import roll_agent
from supervisor.fleet.snapshot import ControlError, ReloadResult
from supervisor.runtime.lifecycle import CAUSE_STOP
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.table import AgentRuntime, WorkerTable

log = get_logger("supervisor.fleet.reload")

#: Config sections the running supervisor keeps until it is restarted.
RESTART_SECTIONS = ("supervisor", "redis", "http")


async def reload_config(
    table: WorkerTable, runner: WorkerRunner, loader: Callable[[Path], FleetConfig]
) -> ReloadResult:
    """Load ``table.config.path`` with ``loader`` (in a thread) and apply the difference.

    Nothing raised while loading or applying stops the supervisor: the error is
    logged and returned, and whatever was not applied keeps running as before.
    """
    path = Path(table.config.path)
    try:
        new_config = await anyio.to_thread.run_sync(loader, path)
    except Exception as exc:
        problems = [str(p) for p in getattr(exc, "problems", [])] or [_error(exc)]
        log.error("reload rejected", errors=problems, config=str(path))
        return ReloadResult(ok=False, errors=problems)
    try:
        return await apply_config_change(table, runner, new_config)
    except Exception as exc:
        log.error("reload failed", error=_error(exc), config=str(path), exc_info=exc)
        return ReloadResult(ok=False, errors=[f"reload failed: {_error(exc)}"])


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def apply_config_change(
    table: WorkerTable, runner: WorkerRunner, new_config: FleetConfig
) -> ReloadResult:
    """Apply a validated config: start, stop, scale and roll agents as the diff says."""
    # Diff with the sections the running supervisor keeps, so a changed [redis]
    # url (which needs a restart) does not mark every agent changed.
    old_config = table.config
    merged = keep_restart_sections(old_config, new_config)
    diff = table.plan.diff(build_plan(merged))
    restart_required = restart_sections_changed(old_config, new_config)
    if restart_required:
        log.warning(
            "reload: these sections changed and need a supervisor restart",
            sections=restart_required,
        )
    log.info(
        "reloading",
        added=diff.added,
        removed=diff.removed,
        changed=diff.changed,
        scaled=diff.scaled,
        unchanged=len(diff.unchanged),
    )
    old_agents = {a.name: a for a in old_config.agents}
    new_agents = {a.name: a for a in new_config.agents}
    table.apply_config(merged)
    async with anyio.create_task_group() as tg:
        for name in diff.removed:
            tg.start_soon(remove_agent, table, runner, name)
    for name in diff.added:
        table.add_agent(new_agents[name])
    for name in diff.scaled + diff.unchanged:
        runtime = table.agents[name]
        table.set_agent_config(runtime, new_agents[name])
        if old_agents[name].replicas != new_agents[name].replicas:
            table.set_desired(runtime, new_agents[name].replicas)
    runner.poke()

    errors: list[str] = []

    async def roll(name: str) -> None:
        runtime = table.agents[name]
        table.set_agent_config(runtime, new_agents[name])
        try:
            await roll_agent(table, runner, runtime)
        except ControlError as exc:
            errors.append(str(exc))
        table.set_desired(runtime, new_agents[name].replicas)
        runner.poke()

    async with anyio.create_task_group() as tg:
        for name in diff.changed:
            tg.start_soon(roll, name)
    return ReloadResult(
        ok=not errors,
        errors=errors,
        added=diff.added,
        removed=diff.removed,
        changed=diff.changed,
        scaled=diff.scaled,
        unchanged=diff.unchanged,
        restart_required=restart_required,
    )


async def remove_agent(table: WorkerTable, runner: WorkerRunner, name: str) -> None:
    """Drain and stop an agent a reload removed, then forget it."""
    runtime = table.get(name)
    if runtime is None:
        return
    await stop_agent_workers(table, runner, runtime)
    table.remove_agent(name)
    log.info("agent removed", agent=name)


async def stop_agent_workers(
    table: WorkerTable, runner: WorkerRunner, runtime: AgentRuntime
) -> None:
    """Disable an agent and drain its workers (they stay stopped until started again)."""
    table.set_enabled(runtime, False)
    async with anyio.create_task_group() as tg:
        for worker in list(runtime.workers.values()):
            tg.start_soon(runner.stop_and_wait, worker, CAUSE_STOP)
    runner.poke()


def _section_digest(config: FleetConfig, section: str) -> str:
    """SHA-256 of one section *with* its secrets.

    ``model_dump(mode="json")`` masks SecretStr values, so a changed Redis
    password or control token would compare equal; the digest folds the
    secret values in (and is never logged).
    """
    model = getattr(config, section)
    payload: dict[str, Any] = {"dump": model.model_dump(mode="json")}
    for name, value in model:
        if isinstance(value, SecretStr):
            payload[name] = value.get_secret_value()
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def restart_sections_changed(old: FleetConfig, new: FleetConfig) -> list[str]:
    """Sections a reload cannot apply (they need a supervisor restart), when they changed."""
    return [
        section
        for section in RESTART_SECTIONS
        if _section_digest(old, section) != _section_digest(new, section)
    ]


def keep_restart_sections(old: FleetConfig, new: FleetConfig) -> FleetConfig:
    """The new agents with the running supervisor/redis/http sections (those need a restart)."""
    try:
        return new.model_copy(
            update={"supervisor": old.supervisor, "redis": old.redis, "http": old.http}
        )
    except AttributeError:  # pragma: no cover - non-pydantic test doubles
        return new
