"""The control API's implementation: status snapshots and the commands operators send.

:class:`FleetController` implements :class:`~supervisor.fleet.snapshot.FleetControl`
for the HTTP server and the SIGHUP handler: ``snapshot``, ``restart``
(at once or rolling), ``scale``, ``stop``, ``start`` and ``reload``. It changes
the worker table through the table's methods and acts through the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from core_bus import __version__
from core_bus.log import get_logger
from core_bus.settings import redact_url
from supervisor.config.models import FleetConfig
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.fleet.reload import reload_config, stop_agent_workers
from supervisor.fleet.rollout import roll_agent
from supervisor.fleet.sampling import RedisHealth
from supervisor.fleet.snapshot import (
    AgentSnapshot,
    ControlError,
    FleetSnapshot,
    ReloadResult,
    UnknownAgentError,
    agent_snapshot,
)
from supervisor.fleet.systemd_status import SystemdStatus
from supervisor.runtime.lifecycle import CAUSE_RESTART
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.table import AgentRuntime, WorkerTable

if TYPE_CHECKING:
    from supervisor.fleetctl.service import FleetCommands

log = get_logger("supervisor.fleet.daemon")


@dataclass
class FleetFacts:
    """What the running supervisor knows about itself, for snapshots."""

    supervisor_name: str
    started_at: float
    redis_url: str | None = None
    http_address: tuple[str, int] | None = None
    #: ``connect()`` keyword arguments of the configured mode (may hold the sentinel password).
    redis_options: dict[str, Any] = field(default_factory=dict)


def check_scale(table: WorkerTable, runtime: AgentRuntime, replicas: int) -> None:
    """The same limits as the config check: ``max_replicas`` and ``[supervisor] max_workers``."""
    limit = runtime.config.max_replicas
    if replicas > limit:
        raise ControlError(
            f"replicas {replicas} is more than agent {runtime.name}'s max_replicas ({limit})"
        )
    others = sum(r.desired for r in table.runtimes() if r is not runtime)
    max_workers = table.config.supervisor.max_workers
    if others + replicas > max_workers:
        raise ControlError(
            f"scaling {runtime.name} to {replicas} makes {others + replicas} workers, more than "
            f"[supervisor] max_workers ({max_workers})"
        )


class FleetController:
    """Implements the control API on the worker table (see the module docstring)."""

    def __init__(
        self,
        table: WorkerTable,
        runner: WorkerRunner,
        *,
        systemd: SystemdStatus,
        health: RedisHealth,
        facts: FleetFacts,
        config_loader: Callable[[Path], FleetConfig] | None,
    ) -> None:
        self._table = table
        self._runner = runner
        self._systemd = systemd
        self._health = health
        self.facts = facts
        self._config_loader = config_loader
        self._reload_lock = anyio.Lock()
        self.delivery: DeliveryHooks | None = None
        self.fleet: FleetCommands | None = None  # the fleet view and fleet-wide restarts
        #: supervisor.membership.service.Membership, set by the daemon (snapshot() only)
        self.membership: Any = None
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None

    @property
    def ready(self) -> bool:
        """The first plan is up (systemd got READY=1)."""
        return self._systemd.ready

    def snapshot(self) -> FleetSnapshot:
        now = anyio.current_time()
        agents: list[AgentSnapshot] = []
        for runtime in self._table.runtimes():
            counters = matched = None
            if self.delivery is not None:
                counters = self.delivery.counters_for(runtime.name)
                matched = self.delivery.matched(runtime.name)
            dlq_length = self._health.dlq_lengths.get(runtime.name)
            agents.append(agent_snapshot(runtime, now, counters, dlq_length, matched))
        config = self._table.config
        facts = self.facts
        return FleetSnapshot(
            version=__version__,
            supervisor_name=facts.supervisor_name,
            started_at=facts.started_at,
            uptime_seconds=time.time() - facts.started_at,
            config_path=str(config.path),
            config_file=str(Path(config.config_dir) / Path(config.path).name),
            config_hash=str(config.hash),
            redis_url=redact_url(facts.redis_url or str(config.redis.url)),
            redis_mode=config.redis.mode,
            redis=config.redis.describe()
            if config.redis.mode != "standalone"
            else redact_url(facts.redis_url or str(config.redis.url)),
            redis_up=self._health.up,
            redis_error=self._health.error,
            agents=agents,
            groups=list(self._health.groups),
            orphan_groups=list(self._health.orphan_groups),
            last_reload_error=self.last_reload_error,
            last_reload_at=self.last_reload_at,
            ready=self.ready,
            membership=self.membership.snapshot() if self.membership is not None else None,
        )

    def _runtime(self, name: str) -> AgentRuntime:
        runtime = self._table.get(name)
        if runtime is None:
            raise UnknownAgentError(f"unknown agent {name!r}")
        return runtime

    async def restart_agent(self, name: str, rolling: bool = False) -> None:
        """Restart every worker (at once, or one replacement at a time when ``rolling``)."""
        runtime = self._runtime(name)
        if not runtime.enabled:
            raise ControlError(f"agent {name!r} is stopped: start it instead")
        if rolling:
            await roll_agent(self._table, self._runner, runtime)
            return
        now = anyio.current_time()
        for worker in list(runtime.workers.values()):
            if worker.lifecycle.running:
                self._runner.stop(worker, CAUSE_RESTART)
            else:
                self._table.request_start(worker, now)
        self._runner.poke()

    async def scale_agent(self, name: str, replicas: int) -> None:
        if replicas < 0:
            raise ControlError("replicas must be >= 0")
        runtime = self._runtime(name)
        check_scale(self._table, runtime, replicas)
        log.info("scaling agent", agent=name, replicas=replicas, previous=runtime.desired)
        self._table.set_desired(runtime, replicas)
        self._runner.poke()

    async def stop_agent(self, name: str) -> None:
        """Stop an agent's workers (drain) and keep them stopped until start_agent."""
        await stop_agent_workers(self._table, self._runner, self._runtime(name))

    async def start_agent(self, name: str) -> None:
        """Start a stopped agent, or clear fatal workers so they are tried again."""
        runtime = self._runtime(name)
        self._table.set_enabled(runtime, True)
        now = anyio.current_time()
        for worker in runtime.workers.values():
            if not worker.lifecycle.running:
                self._table.request_start(worker, now)
        self._runner.poke()

    async def reload(self) -> ReloadResult:
        """Re-read the config file and apply the difference (see :mod:`supervisor.fleet.reload`)."""
        if self._config_loader is None:
            raise ControlError("reload is not available: no config loader")
        async with self._reload_lock:  # SIGHUP twice, or SIGHUP and the API: one at a time
            self._systemd.reloading()
            self.last_reload_at = time.time()
            try:
                result = await reload_config(self._table, self._runner, self._config_loader)
                self.last_reload_error = "; ".join(result.errors) if result.errors else None
                return result
            finally:
                self._systemd.reloaded(self._table.agents)
