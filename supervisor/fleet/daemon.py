"""The fleet daemon: the composition root that wires the supervisor's parts together.

Who does what: the :class:`~supervisor.runtime.table.WorkerTable` holds agents
and workers (its one writer); the :class:`~supervisor.fleet.reconciler.Reconciler`
drives it towards the plan; the :class:`~supervisor.runtime.runner.WorkerRunner`
spawns, watches and stops processes; the
:class:`~supervisor.fleet.controller.FleetController` implements the control API;
:mod:`supervisor.delivery` moves pending entries; sampling, the sweep and
systemd's watchdog are small loops here. Everything runs in one event loop,
every task belongs to the daemon's task groups, and signal handlers only
queue (SIGTERM/SIGINT stop, SIGHUP reloads: a failed reload is logged and
the old plan keeps running).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import connect, redact_url
from core_bus.streams.slots import keys_for
from supervisor.config.models import FleetConfig
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.delivery.rebalance import Rebalancer
from supervisor.fleet.controller import FleetController, FleetFacts
from supervisor.fleet.reconciler import Reconciler
from supervisor.fleet.sampling import GUARD_INTERVAL, RedisHealth, guard_memory, sample_workers
from supervisor.fleet.systemd_status import SystemdStatus, watchdog_interval
from supervisor.fleetctl.execute import execute_command
from supervisor.fleetctl.follower import CommandFollower
from supervisor.fleetctl.service import FleetCommands
from supervisor.membership.service import Membership
from supervisor.redis.target import connect_options, worker_redis_env
from supervisor.runtime.lifecycle import CAUSE_MEMORY
from supervisor.runtime.notify import NotifyServer
from supervisor.runtime.process import probe_spawn_tools
from supervisor.runtime.resources import ResourceSampler
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.sdnotify import Notifier
from supervisor.runtime.table import AgentRuntime, WorkerTable
from supervisor.runtime.worker_env import FleetContext, child_environment

log = get_logger("supervisor.fleet.daemon")

#: How often RSS/CPU, memory limits, group pending/lag and Redis health are sampled.
SAMPLE_INTERVAL = 5.0
#: Redis calls made by the daemon never block the loop longer than this.
REDIS_TIMEOUT = 5.0


class FleetDaemon:
    """Runs a FleetConfig until SIGTERM/SIGINT or :meth:`request_stop`."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        config_loader: Callable[[Path], FleetConfig] | None = None,
        environ: dict[str, str] | None = None,
        systemd: Notifier | None = None,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        environ = dict(os.environ if environ is None else environ)
        self._base_env = child_environment(environ)
        self._systemd = SystemdStatus(systemd if systemd is not None else Notifier(None))
        self._watchdog_interval = watchdog_interval(environ)
        self.sample_interval = sample_interval
        self.table = WorkerTable(config)
        self._runner = WorkerRunner(self.table, poke=self._poke, fleet_context=self._fleet_context)
        self._reconciler = Reconciler(self.table, self._runner, self._systemd)
        self._health = RedisHealth()
        self.control = FleetController(
            self.table,
            self._runner,
            systemd=self._systemd,
            health=self._health,
            facts=FleetFacts(str(config.supervisor.name), time.time()),
            config_loader=config_loader,
        )
        self._sampler = ResourceSampler()
        self._stop_requested = anyio.Event()
        self._notify: NotifyServer | None = None

    @property
    def config(self) -> FleetConfig:
        return self.table.config

    @property
    def agents(self) -> dict[str, AgentRuntime]:
        return self.table.agents

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self.control.facts.http_address

    def _sweep_interval(self) -> float:
        return float(self.config.supervisor.sweep_interval)

    def _poke(self) -> None:
        self._reconciler.poke()

    def _fleet_context(self) -> FleetContext:
        assert self._notify is not None and self.control.facts.redis_url is not None
        return FleetContext(
            base_env=self._base_env,
            redis_url=self.control.facts.redis_url,
            namespace=self.config.redis.namespace,
            notify_socket=self._notify.address,
            config_dir=self.config.config_dir,
            lease_ttl=float(self.config.supervisor.lease_ttl),
            member_lease_key=StreamKeyBuilder(
                self.config.redis.namespace, cluster=self.config.redis.mode == "cluster"
            ).fleet_lease(str(self.config.supervisor.name)),
            redis_env=worker_redis_env(self.config.redis),
        )

    # -- main ----------------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`); stop workers and return."""
        sockets: list[socket.socket] = []
        if self.config.http.enabled:
            from supervisor.http.listen import bind_http

            # First of all: a port in use must fail before the embedded Redis starts.
            sockets = bind_http(self.config.http, _secret(self.config))
        try:
            await self._run_with_redis(sockets, task_status)
        finally:
            for sock in sockets:
                sock.close()

    async def _run_with_redis(
        self, sockets: list[socket.socket], task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        async with anyio.create_task_group() as outer:
            redis = self.config.redis
            if redis.embedded:
                from supervisor.redis.embedded import run_embedded_redis

                embedded_url: str = await outer.start(
                    run_embedded_redis, self.config.supervisor.state_dir, redis.embedded_port
                )
                self.control.facts.redis_url = redis.effective_url(embedded_url)
            else:
                self.control.facts.redis_url = redis.effective_url()
            self.control.facts.redis_options = connect_options(redis)
            try:
                await self._run_fleet(task_status, sockets)
            finally:
                outer.cancel_scope.cancel()

    async def _run_fleet(
        self, task_status: anyio.abc.TaskStatus[None], sockets: list[socket.socket]
    ) -> None:
        facts = self.control.facts
        async with self._redis_client() as redis:
            keys = keys_for(redis, self.config.redis.namespace)
            delivery = DeliveryHooks(Rebalancer(redis, keys, facts.supervisor_name), self.table)
            self.control.delivery = delivery
            self.control.fleet = FleetCommands(redis, keys, facts.supervisor_name)
            commands = CommandFollower(
                redis,
                keys,
                facts.supervisor_name,
                partial(execute_command, self.control, self.table, self._runner),
            )
            membership = Membership(
                name=facts.supervisor_name,
                lease_ttl=float(self.config.supervisor.lease_ttl),
                redis_url=facts.redis_url or "",
                keys=keys,
                redis_options=facts.redis_options,
                table=self.table,
                hooks=delivery,
                http_address=lambda: _address_text(facts.http_address),
            )
            self.control.membership = membership
            with (
                NotifyServer(state_dir=self.config.supervisor.state_dir) as notify_server,
                anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
            ):
                self._notify = notify_server
                try:
                    async with anyio.create_task_group() as tg:
                        self._runner.bind(
                            tg,
                            supervisor_name=facts.supervisor_name,
                            delivery=delivery,
                            drain_notify=notify_server.receive_ready,
                        )
                        # HTTP first: a refused address must fail before any worker starts.
                        if self.config.http.enabled:
                            from supervisor.http.server import run_http_server

                            facts.http_address = await tg.start(
                                partial(
                                    run_http_server, token=_secret(self.config), sockets=sockets
                                ),
                                self.control,
                                self.config.http,
                            )
                        # setpriv is probed with a subprocess: never on the loop.
                        await anyio.to_thread.run_sync(probe_spawn_tools)
                        tg.start_soon(notify_server.serve, self._runner.on_notify)
                        tg.start_soon(self._signal_loop, signals, tg)
                        tg.start_soon(self._reconciler.run)
                        tg.start_soon(
                            partial(self._health.ping_loop, options=facts.redis_options),
                            facts.redis_url or "",
                        )
                        tg.start_soon(self._sample_loop, redis, delivery)
                        tg.start_soon(self._memory_guard_loop)
                        tg.start_soon(delivery.sweep_loop, self._sweep_interval)
                        tg.start_soon(commands.run)  # fleet-wide commands addressed to us
                        tg.start_soon(membership.run)
                        if self._watchdog_interval is not None:
                            tg.start_soon(self._systemd.watchdog_loop, self._watchdog_interval)
                        log.info(
                            "supervisor started",
                            supervisor=facts.supervisor_name,
                            agents=len(self.table.agents),
                            redis=self.config.redis.describe()
                            if self.config.redis.mode != "standalone"
                            else redact_url(facts.redis_url or ""),
                            redis_mode=self.config.redis.mode,
                            notify_socket=notify_server.address,
                            http=_address_text(facts.http_address),
                        )
                        task_status.started()
                        await self._stop_requested.wait()
                        self._systemd.stopping()
                        await self._reconciler.stop_all()
                        await membership.leave()  # workers drained: drop the lease now
                        tg.cancel_scope.cancel()
                finally:
                    self._notify = None
                    self._runner.unbind()
        self._systemd.notifier.close()
        log.info("supervisor stopped", supervisor=facts.supervisor_name)

    @asynccontextmanager
    async def _redis_client(self) -> AsyncIterator[Any]:
        facts = self.control.facts
        redis = connect(facts.redis_url, socket_timeout=REDIS_TIMEOUT, **facts.redis_options)
        try:
            yield redis
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await redis.aclose()

    def request_stop(self, force: bool = False) -> None:
        """Graceful stop (what SIGTERM does); a second call or ``force`` kills at once."""
        self._runner.begin_stop(force=self._stop_requested.is_set() or force)
        self._stop_requested.set()
        self._poke()

    async def _signal_loop(self, signals: Any, tg: anyio.abc.TaskGroup) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("reload requested", signal="SIGHUP")
                tg.start_soon(self._reload_logged)
            else:
                log.info(
                    "stop requested",
                    signal=signal.Signals(signum).name,
                    force=self._stop_requested.is_set(),
                )
                self.request_stop()

    async def _reload_logged(self) -> None:
        """A SIGHUP reload: whatever goes wrong is logged; the daemon keeps running."""
        try:
            await self.control.reload()
        except Exception as exc:
            log.error("reload failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    # -- periodic work -----------------------------------------------------------------------
    async def _sample_loop(self, redis: Any, delivery: DeliveryHooks) -> None:
        """RSS/CPU against memory limits, Redis health and group stats, every interval."""
        while True:
            for worker in await sample_workers(self._sampler, self.table):
                self._runner.stop(worker, CAUSE_MEMORY)
            await self._health.probe(redis, delivery, self.table.runtimes(), REDIS_TIMEOUT)
            self._systemd.update(self.table.agents)
            await anyio.sleep(self.sample_interval)

    async def _memory_guard_loop(self) -> None:
        """Between full samples: the RSS of workers with a ``memory_limit``, every
        GUARD_INTERVAL; one over it gets the same graceful restart (it leaves READY
        with the stop, so it is stopped once)."""
        while True:
            for worker in await guard_memory(self._sampler, self.table):
                self._runner.stop(worker, CAUSE_MEMORY)
            await anyio.sleep(GUARD_INTERVAL)


def _address_text(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _secret(config: FleetConfig) -> str | None:
    """The control token (``AG1_CONTROL_TOKEN`` / ``AG1_HTTP__TOKEN``, read by the loader)."""
    token = config.http.token
    return None if token is None else token.get_secret_value()
