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
from typing import Any, Protocol

import anyio
from pydantic import SecretStr

from core_bus.log import get_logger
from supervisor.config.plan import Plan, build_plan
from supervisor.fleet.snapshot import ControlError, ReloadResult
from supervisor.runtime.table import AgentRuntime

log = get_logger("supervisor.fleet.reload")

#: Config sections the running supervisor keeps until it is restarted.
RESTART_SECTIONS = ("supervisor", "redis", "http")


class ReloadOps(Protocol):
    """What applying a reload needs of the daemon."""

    config: Any
    plan: Plan
    agents: dict[str, AgentRuntime]

    def apply_config(self, config: Any) -> None: ...

    def poke(self) -> None: ...

    async def remove_agent(self, name: str) -> None: ...

    async def roll(self, runtime: AgentRuntime) -> None: ...


async def reload_config(ops: ReloadOps, loader: Callable[[Path], Any]) -> ReloadResult:
    """Load ``ops.config.path`` with ``loader`` (in a thread) and apply the difference."""
    try:
        new_config = await anyio.to_thread.run_sync(loader, Path(ops.config.path))
    except Exception as exc:
        problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
        log.error("reload rejected", errors=problems, config=str(ops.config.path))
        return ReloadResult(ok=False, errors=problems)
    return await apply_config_change(ops, new_config)


async def apply_config_change(ops: ReloadOps, new_config: Any) -> ReloadResult:
    """Apply a validated config: start, stop, scale and roll agents as the diff says."""
    # Diff with the sections the running supervisor keeps, so a changed [redis]
    # url (which needs a restart) does not mark every agent changed.
    merged = keep_restart_sections(ops.config, new_config)
    diff = ops.plan.diff(build_plan(merged))
    restart_required = restart_sections_changed(ops.config, new_config)
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
    old_agents = {a.name: a for a in ops.config.agents}
    new_agents = {a.name: a for a in new_config.agents}
    ops.apply_config(merged)
    async with anyio.create_task_group() as tg:
        for name in diff.removed:
            tg.start_soon(ops.remove_agent, name)
    for name in diff.added:
        ops.agents[name] = AgentRuntime(new_agents[name], desired=new_agents[name].replicas)
    for name in diff.scaled + diff.unchanged:
        runtime = ops.agents[name]
        runtime.config = new_agents[name]
        if old_agents[name].replicas != new_agents[name].replicas:
            runtime.desired = new_agents[name].replicas
    ops.poke()

    errors: list[str] = []

    async def roll(name: str) -> None:
        runtime = ops.agents[name]
        runtime.config = new_agents[name]
        try:
            await ops.roll(runtime)
        except ControlError as exc:
            errors.append(str(exc))
        runtime.desired = new_agents[name].replicas
        ops.poke()

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


def _section_digest(config: Any, section: str) -> str:
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


def restart_sections_changed(old: Any, new: Any) -> list[str]:
    """Sections a reload cannot apply (they need a supervisor restart), when they changed."""
    return [
        section
        for section in RESTART_SECTIONS
        if _section_digest(old, section) != _section_digest(new, section)
    ]


def keep_restart_sections(old: Any, new: Any) -> Any:
    """The new agents with the running supervisor/redis/http sections (those need a restart)."""
    try:
        return new.model_copy(
            update={"supervisor": old.supervisor, "redis": old.redis, "http": old.http}
        )
    except AttributeError:  # pragma: no cover - non-pydantic test doubles
        return new
