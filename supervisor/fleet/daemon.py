"""The fleet daemon: one reconcile loop driving desired vs observed workers.

Wiring only: the lifecycle policy is :mod:`supervisor.runtime.lifecycle` (pure),
spawning, watching and stopping worker processes and applying their notify
messages is :mod:`supervisor.runtime.runner` (processes are
:mod:`supervisor.runtime.process`, argv and environment from
:mod:`supervisor.runtime.worker_env`), exits are read by :mod:`supervisor.runtime.exits`,
readiness and heartbeats arrive on :mod:`supervisor.runtime.notify`, pending entries
move with :mod:`supervisor.delivery.hooks`, rolling restarts are
:mod:`supervisor.fleet.rollout`, live reload :mod:`supervisor.fleet.reload`, periodic
sampling :mod:`supervisor.fleet.sampling` and systemd hears from
:mod:`supervisor.fleet.systemd_status`. Everything runs in one event loop and
every task belongs to the daemon's task group; signal handlers only queue.

Exit of a worker is noticed at once (a task awaits each child's pidfd), the
lifecycle decides restart/backoff/fatal, and its consumer's pending entries
are reclaimed to live siblings immediately (or to the first worker that
becomes ready when none is alive).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import redact_url
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.delivery.rebalance import Rebalancer
from supervisor.fleet.reload import reload_config
from supervisor.fleet.rollout import roll_agent
from supervisor.fleet.sampling import RedisHealth, sample_workers
from supervisor.fleet.snapshot import (
    AgentSnapshot,
    ControlError,
    FleetSnapshot,
    ReloadResult,
    UnknownAgentError,
)
from supervisor.fleet.systemd_status import SystemdStatus, watchdog_interval
from supervisor.runtime.lifecycle import (
    CAUSE_MEMORY,
    CAUSE_RESTART,
    CAUSE_STOP,
    CAUSE_WATCHDOG,
    WorkerLifecycle,
)
from supervisor.runtime.notify import NotifyServer
from supervisor.runtime.resources import ResourceSampler
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.sdnotify import Notifier
from supervisor.runtime.table import (
    AgentRuntime,
    Worker,
    agent_snapshot,
    dependencies_ready,
)
from supervisor.runtime.worker_env import FleetContext, child_environment

log = get_logger("supervisor.fleet.daemon")

#: How often RSS/CPU, memory limits, group pending/lag and Redis health are sampled.
SAMPLE_INTERVAL = 5.0
#: Redis calls made by the daemon never block the loop longer than this.
REDIS_TIMEOUT = 5.0


class FleetDaemon:
    """Runs a FleetConfig; implements :class:`supervisor.fleet.snapshot.FleetControl`."""

    def __init__(
        self,
        config: Any,
        *,
        config_loader: Callable[[Path], Any] | None = None,
        environ: dict[str, str] | None = None,
        systemd: Notifier | None = None,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.config = config
        self._config_loader = config_loader
        environ = dict(os.environ if environ is None else environ)
        self._base_env = child_environment(environ)
        self._systemd = SystemdStatus(systemd if systemd is not None else Notifier(None))
        self._watchdog_interval = watchdog_interval(environ)
        self.sample_interval = sample_interval
        self.agents: dict[str, AgentRuntime] = {}
        self.layers: list[list[str]] = []
        self._sampler = ResourceSampler()
        self._wake = anyio.Event()
        self._stop_requested = anyio.Event()
        self._reload_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._notify: NotifyServer | None = None
        self._redis: Any = None
        self._delivery: DeliveryHooks | None = None
        self.redis_url: str | None = None
        self._health = RedisHealth()
        self.started_at = time.time()
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None
        self.http_address: tuple[str, int] | None = None
        self.apply_config(config, initial=True)
        self._runner = WorkerRunner(self.agents, poke=self.poke, fleet_context=self._fleet_context)

    # -- setup -------------------------------------------------------------------------
    def apply_config(self, config: Any, initial: bool = False) -> None:
        from supervisor.config.plan import build_plan

        self.config = config
        self.plan = build_plan(config)
        self.layers = self.plan.start_order()
        if initial:
            for agent in config.agents:
                self.agents[agent.name] = AgentRuntime(agent, desired=agent.replicas)

    @property
    def supervisor_name(self) -> str:
        return str(self.config.supervisor.name)

    def now(self) -> float:
        return anyio.current_time()

    # -- main ----------------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`); stop workers and return."""
        async with anyio.create_task_group() as outer:
            if self.config.redis.embedded:
                from supervisor.redis.embedded import run_embedded_redis

                embedded_url: str = await outer.start(
                    run_embedded_redis,
                    self.config.supervisor.state_dir,
                    self.config.redis.embedded_port,
                )
                self.redis_url = self.config.redis.effective_url(embedded_url)
            else:
                self.redis_url = self.config.redis.effective_url()
            try:
                await self._run_fleet(task_status)
            finally:
                outer.cancel_scope.cancel()

    async def _run_fleet(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        from core_bus.settings import connect

        self._redis = connect(self.redis_url, socket_timeout=REDIS_TIMEOUT)
        self._delivery = DeliveryHooks(
            Rebalancer(
                self._redis, StreamKeyBuilder(self.config.redis.namespace), self.supervisor_name
            ),
            self.supervisor_name,
        )
        try:
            with (
                NotifyServer() as notify_server,
                anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
            ):
                self._notify = notify_server
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    self._runner.bind(
                        tg, supervisor_name=self.supervisor_name, delivery=self._delivery
                    )
                    # HTTP first: a refused address must fail before any worker starts.
                    if self.config.http.enabled:
                        from supervisor.http.server import run_http_server

                        # config.http.token already comes from AG1_CONTROL_TOKEN /
                        # AG1_HTTP__TOKEN (the config loader reads secrets from the env).
                        token = _secret(self.config.http)
                        self.http_address = await tg.start(
                            partial(run_http_server, token=token), self, self.config.http
                        )
                    tg.start_soon(notify_server.serve, self._runner.on_notify)
                    tg.start_soon(self._signal_loop, signals)
                    tg.start_soon(self._reconcile_loop)
                    tg.start_soon(self._sample_loop)
                    tg.start_soon(self._sweep_loop)
                    if self._watchdog_interval is not None:
                        tg.start_soon(self._systemd.watchdog_loop, self._watchdog_interval)
                    log.info(
                        "supervisor started",
                        supervisor=self.supervisor_name,
                        agents=len(self.agents),
                        redis=redact_url(self.redis_url or ""),
                        notify_socket=notify_server.address,
                        http=_address_text(self.http_address),
                    )
                    task_status.started()
                    await self._stop_requested.wait()
                    self._systemd.stopping()
                    await self._stop_all()
                    tg.cancel_scope.cancel()
        finally:
            self._notify = None
            self._tg = None
            self._runner.unbind()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._redis.aclose()
            log.info("supervisor stopped", supervisor=self.supervisor_name)

    def request_stop(self, force: bool = False) -> None:
        """Graceful stop (what SIGTERM does); a second call or ``force`` kills at once."""
        self._runner.begin_stop(force=self._stop_requested.is_set() or force)
        self._stop_requested.set()
        self._wake.set()

    async def _signal_loop(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("reload requested", signal="SIGHUP")
                assert self._tg is not None
                self._tg.start_soon(self._reload_logged)
            else:
                log.info(
                    "stop requested",
                    signal=signal.Signals(signum).name,
                    force=self._stop_requested.is_set(),
                )
                self.request_stop()

    async def _reload_logged(self) -> None:
        await self.reload()

    async def _stop_all(self) -> None:
        """Stop layers in reverse start order; each layer's workers in parallel."""
        for layer in self.plan.stop_order():
            async with anyio.create_task_group() as tg:
                for name in layer:
                    runtime = self.agents.get(name)
                    if runtime is None:
                        continue
                    runtime.enabled = False
                    for worker in list(runtime.workers.values()):
                        tg.start_soon(self.stop_and_wait, worker, CAUSE_STOP)
        # Agents added by a reload but not in a layer yet, and any stragglers.
        async with anyio.create_task_group() as tg:
            for worker in self._runner.all_workers():
                tg.start_soon(self.stop_and_wait, worker, CAUSE_STOP)

    # -- reconcile ---------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while True:
            # A fresh event before acting: a poke during _reconcile is never lost.
            self._wake = anyio.Event()
            self._reconcile(self.now())
            deadline = self._next_deadline()
            if deadline is None:
                await self._wake.wait()
            else:
                with anyio.move_on_after(max(0.0, deadline - self.now())):
                    await self._wake.wait()

    def poke(self) -> None:
        self._wake.set()

    def _next_deadline(self) -> float | None:
        """Earliest timer of the workers :meth:`_reconcile` ticks (None: wait for events)."""
        if self._runner.stopping:
            return None
        known: list[float] = []
        for layer in self.layers:
            for name in layer:
                runtime = self.agents.get(name)
                if runtime is None:
                    continue
                for worker in runtime.workers.values():
                    deadline = worker.lifecycle.next_deadline()
                    if deadline is not None:
                        known.append(deadline)
        return min(known) if known else None

    def _reconcile(self, now: float) -> None:
        if self._runner.stopping:
            return
        for layer_index, layer in enumerate(self.layers):
            for name in layer:
                runtime = self.agents.get(name)
                if runtime is None:
                    continue
                if not runtime.gate_open and dependencies_ready(self.agents, runtime):
                    runtime.gate_open = True
                    if layer_index:
                        log.info("agent dependencies ready", agent=name)
                if runtime.gate_open and runtime.enabled:
                    self._scale(runtime, now)
                for worker in list(runtime.workers.values()):
                    self._tick_worker(runtime, worker, now)
        self._systemd.update(self.agents)

    def _scale(self, runtime: AgentRuntime, now: float) -> None:
        if runtime.rolling:
            return
        active = runtime.active()
        if len(active) < runtime.desired:
            used = set(runtime.workers)
            slot = 0
            for _ in range(runtime.desired - len(active)):
                while slot in used:
                    slot += 1
                used.add(slot)
                self.add_worker(runtime, slot, now)
        elif len(active) > runtime.desired:
            for worker in sorted(active, key=lambda w: w.slot)[runtime.desired :]:
                worker.retired = True
                self.stop_worker(worker, CAUSE_STOP)
        # Workers retired and stopped leave the table.
        for slot, worker in list(runtime.workers.items()):
            if worker.retired and not worker.lifecycle.running:
                del runtime.workers[slot]

    def add_worker(self, runtime: AgentRuntime, slot: int, now: float) -> Worker:
        lifecycle = WorkerLifecycle(runtime.policy)
        lifecycle.request_start(now)
        worker = Worker(runtime.name, slot, lifecycle)
        runtime.workers[slot] = worker
        return worker

    def _tick_worker(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        action = worker.lifecycle.tick(now)
        if action is None:
            return
        if action.kind == "spawn":
            if runtime.enabled and not worker.retired:
                self.spawn_worker(runtime, worker, now)
            else:  # not wanted any more: leave backoff for stopped (no busy timer)
                worker.lifecycle.on_stop_requested(CAUSE_STOP)
                self._runner.worker_changed(worker)
        elif action.kind == "ready":
            self._runner.mark_ready(runtime, worker, now)
        elif action.kind == "kill":
            log.warning(
                "worker unresponsive",
                agent=runtime.name,
                worker=worker.key,
                pid=worker.pid,
                cause=action.cause,
            )
            self.stop_worker(worker, action.cause or CAUSE_WATCHDOG, kill=True)

    # -- workers (carried out by supervisor.runtime.runner) -----------------------------
    def _fleet_context(self) -> FleetContext:
        assert self._notify is not None and self.redis_url is not None
        return FleetContext(
            base_env=self._base_env,
            redis_url=self.redis_url,
            namespace=self.config.redis.namespace,
            notify_socket=self._notify.address,
            config_dir=self.config.config_dir,
        )

    def spawn_worker(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        self._runner.spawn(runtime, worker, now)

    def stop_worker(self, worker: Worker, cause: str, kill: bool = False) -> None:
        """Ask a worker to stop (SIGTERM, SIGKILL after stop_timeout; ``kill``: at once)."""
        self._runner.stop(worker, cause, kill)

    async def stop_and_wait(self, worker: Worker, cause: str) -> None:
        await self._runner.stop_and_wait(worker, cause)

    # -- delivery ------------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        if self._delivery is None:
            return
        while True:
            base = float(self.config.supervisor.sweep_interval)
            await anyio.sleep(self._delivery.sweep_period(self.agents.values(), base))
            await self._delivery.sweep_due(self.agents.values(), self.now(), base)

    # -- sampling ----------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            await self._sample_once()
            await anyio.sleep(self.sample_interval)

    async def _sample_once(self) -> None:
        for worker in await sample_workers(self._sampler, self._runner.all_workers(), self.agents):
            self.stop_worker(worker, CAUSE_MEMORY)
        await self._health.probe(self._redis, self._delivery, self.agents.values(), REDIS_TIMEOUT)
        self._systemd.update(self.agents)

    @property
    def ready(self) -> bool:
        """The first plan is up (systemd got READY=1)."""
        return self._systemd.ready

    # -- FleetControl ------------------------------------------------------------------------
    def snapshot(self) -> FleetSnapshot:
        now = self.now()
        agents: list[AgentSnapshot] = []
        for runtime in self.agents.values():
            counters = None
            if self._delivery is not None:
                counters = self._delivery.counters_for(runtime.name)
            agents.append(agent_snapshot(runtime, now, counters))
        from core_bus import __version__

        return FleetSnapshot(
            version=__version__,
            supervisor_name=self.supervisor_name,
            started_at=self.started_at,
            uptime_seconds=time.time() - self.started_at,
            config_path=str(self.config.path),
            config_hash=str(self.config.hash),
            redis_url=redact_url(self.redis_url or str(self.config.redis.url)),
            redis_up=self._health.up,
            redis_error=self._health.error,
            agents=agents,
            groups=list(self._health.groups),
            last_reload_error=self.last_reload_error,
            last_reload_at=self.last_reload_at,
            ready=self.ready,
        )

    def _runtime(self, name: str) -> AgentRuntime:
        runtime = self.agents.get(name)
        if runtime is None:
            raise UnknownAgentError(f"unknown agent {name!r}")
        return runtime

    async def restart_agent(self, name: str, rolling: bool = False) -> None:
        """Restart every worker (at once, or one replacement at a time when ``rolling``)."""
        runtime = self._runtime(name)
        if not runtime.enabled:
            raise ControlError(f"agent {name!r} is stopped: start it instead")
        if rolling:
            await self.roll(runtime)
            return
        now = self.now()
        for worker in list(runtime.workers.values()):
            if worker.lifecycle.running:
                self.stop_worker(worker, CAUSE_RESTART)
            else:
                worker.lifecycle.request_start(now)
        self.poke()

    async def scale_agent(self, name: str, replicas: int) -> None:
        if replicas < 0:
            raise ControlError("replicas must be >= 0")
        runtime = self._runtime(name)
        log.info("scaling agent", agent=name, replicas=replicas, previous=runtime.desired)
        runtime.desired = replicas
        self.poke()

    async def stop_agent(self, name: str) -> None:
        """Stop an agent's workers (drain) and keep them stopped until start_agent."""
        runtime = self._runtime(name)
        runtime.enabled = False
        async with anyio.create_task_group() as tg:
            for worker in list(runtime.workers.values()):
                tg.start_soon(self.stop_and_wait, worker, CAUSE_STOP)
        self.poke()

    async def start_agent(self, name: str) -> None:
        """Start a stopped agent, or clear fatal workers so they are tried again."""
        runtime = self._runtime(name)
        runtime.enabled = True
        now = self.now()
        for worker in runtime.workers.values():
            if not worker.lifecycle.running:
                worker.lifecycle.request_start(now)
        self.poke()

    async def reload(self) -> ReloadResult:
        """Re-read the config file and apply the difference (see :mod:`supervisor.fleet.reload`)."""
        if self._config_loader is None:
            raise ControlError("reload is not available: no config loader")
        async with self._reload_lock:  # SIGHUP twice, or SIGHUP and the API: one at a time
            self._systemd.reloading()
            self.last_reload_at = time.time()
            try:
                result = await reload_config(self, self._config_loader)
                self.last_reload_error = "; ".join(result.errors) if result.errors else None
                return result
            finally:
                self._systemd.reloaded(self.agents)

    # -- used by supervisor.fleet.rollout and supervisor.fleet.reload --------------------
    @property
    def stopping(self) -> bool:
        return self._runner.stopping

    async def roll(self, runtime: AgentRuntime) -> None:
        """Rolling restart of one agent (:func:`supervisor.fleet.rollout.roll_agent`)."""
        await roll_agent(self, runtime)

    async def wait_changed(self) -> None:
        """Wait until any worker's state changes."""
        await self._runner.wait_changed()

    async def remove_agent(self, name: str) -> None:
        """Drain and stop an agent a reload removed, then forget it."""
        if name not in self.agents:
            return
        await self.stop_agent(name)
        self.agents.pop(name, None)
        log.info("agent removed", agent=name)


def _address_text(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _secret(http: Any) -> str | None:
    token = getattr(http, "token", None)
    if token is None:
        return None
    return str(token.get_secret_value())
