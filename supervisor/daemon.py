"""The fleet daemon: one reconcile loop driving desired vs observed workers.

Wiring only: the lifecycle policy is :mod:`supervisor.lifecycle` (pure),
processes are :mod:`supervisor.process`, readiness and heartbeats arrive on
:mod:`supervisor.notify`, pending entries move with
:mod:`supervisor.rebalance`. Everything runs in one event loop and every task
belongs to the daemon's task group; signal handlers only queue.

Exit of a worker is noticed at once (a task awaits each child's pidfd), the
lifecycle decides restart/backoff/fatal, and its consumer's pending entries
are reclaimed to live siblings immediately (or to the first worker that
becomes ready when none is alive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from pydantic import SecretStr

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import redact_url
from core_bus.stats import SubscriptionStats
from supervisor.delivery_hooks import DeliveryHooks
from supervisor.fleet_state import (
    AgentRuntime,
    IncarnationIds,
    Worker,
    agent_snapshot,
    agent_state,
    child_environment,
)
from supervisor.lifecycle import (
    CAUSE_MEMORY,
    CAUSE_RESTART,
    CAUSE_START_TIMEOUT,
    CAUSE_STOP,
    CAUSE_WATCHDOG,
    ExitInfo,
    WorkerLifecycle,
    WorkerState,
)
from supervisor.logcapture import LineCapture, TokenBucket
from supervisor.notify import NotifyMessage, NotifyServer, SenderIndex
from supervisor.process import ChildProcess, ExitStatus
from supervisor.rebalance import Rebalancer
from supervisor.resources import ResourceSampler
from supervisor.sdnotify import Notifier
from supervisor.snapshot import (
    AgentSnapshot,
    ControlError,
    FleetSnapshot,
    GroupSnapshot,
    ReloadResult,
    UnknownAgentError,
)

log = get_logger("supervisor.daemon")

#: How often RSS/CPU, memory limits, group pending/lag and Redis health are sampled.
SAMPLE_INTERVAL = 5.0
#: Seconds the log readers of an exited child may still drain its pipes.
OUTPUT_GRACE = 1.0
#: Redis calls made by the daemon never block the loop longer than this.
REDIS_TIMEOUT = 5.0
#: Config sections the running supervisor keeps until it is restarted.
RESTART_SECTIONS = ("supervisor", "redis", "http")


class FleetDaemon:
    """Runs a FleetConfig; implements :class:`supervisor.snapshot.FleetControl`."""

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
        self._systemd = systemd if systemd is not None else Notifier(None)
        self._watchdog_interval = _systemd_watchdog_interval(environ)
        self.sample_interval = sample_interval
        self.agents: dict[str, AgentRuntime] = {}
        self.layers: list[list[str]] = []
        self._senders = SenderIndex()
        self._ids = IncarnationIds()
        self._sampler = ResourceSampler()
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._stop_requested = anyio.Event()
        self._reload_lock = anyio.Lock()
        self._force_stop = False
        self._stopping = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._notify: NotifyServer | None = None
        self._redis: Any = None
        self._delivery: DeliveryHooks | None = None
        self.redis_url: str | None = None
        self.redis_up = False
        self.redis_error: str | None = None
        self._groups: list[GroupSnapshot] = []
        self.started_at = time.time()
        self.ready = False
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None
        self._status_line = ""
        self.http_address: tuple[str, int] | None = None
        self._apply_config(config, initial=True)

    # -- setup -------------------------------------------------------------------------
    def _apply_config(self, config: Any, initial: bool = False) -> None:
        from supervisor.plan import build_plan

        self.config = config
        self.plan = build_plan(config)
        self.layers = self.plan.start_order()
        if initial:
            for agent in config.agents:
                self.agents[agent.name] = AgentRuntime(agent, desired=agent.replicas)

    @property
    def supervisor_name(self) -> str:
        return str(self.config.supervisor.name)

    def _now(self) -> float:
        return anyio.current_time()

    # -- main ----------------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`); stop workers and return."""
        async with anyio.create_task_group() as outer:
            if self.config.redis.embedded:
                from supervisor.embedded import run_embedded_redis

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
                    # HTTP first: a refused address must fail before any worker starts.
                    if self.config.http.enabled:
                        from supervisor.http_server import run_http_server

                        # config.http.token already comes from AG1_CONTROL_TOKEN /
                        # AG1_HTTP__TOKEN (the config loader reads secrets from the env).
                        token = _secret(self.config.http)
                        self.http_address = await tg.start(
                            partial(run_http_server, token=token), self, self.config.http
                        )
                    tg.start_soon(notify_server.serve, self._on_notify)
                    tg.start_soon(self._signal_loop, signals)
                    tg.start_soon(self._reconcile_loop)
                    tg.start_soon(self._sample_loop)
                    tg.start_soon(self._sweep_loop)
                    if self._watchdog_interval is not None:
                        tg.start_soon(self._systemd_watchdog_loop, self._watchdog_interval)
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
                    self._systemd.send("STOPPING=1", "STATUS=stopping workers")
                    await self._stop_all()
                    tg.cancel_scope.cancel()
        finally:
            self._notify = None
            self._tg = None
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self._redis.aclose()
            log.info("supervisor stopped", supervisor=self.supervisor_name)

    def request_stop(self, force: bool = False) -> None:
        """Graceful stop (what SIGTERM does); a second call or ``force`` kills at once."""
        if self._stop_requested.is_set() or force:
            self._force_stop = True
            for worker in self._all_workers():
                if worker.process is not None and worker.lifecycle.running:
                    worker.lifecycle.on_stop_requested(CAUSE_STOP)
                    worker.process.signal_group(signal.SIGKILL)
        self._stopping = True
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
                        tg.start_soon(self._stop_and_wait, worker, CAUSE_STOP)
        # Agents added by a reload but not in a layer yet, and any stragglers.
        async with anyio.create_task_group() as tg:
            for worker in self._all_workers():
                tg.start_soon(self._stop_and_wait, worker, CAUSE_STOP)

    async def _stop_and_wait(self, worker: Worker, cause: str) -> None:
        self._stop_worker(worker, cause)
        while worker.lifecycle.running:
            await worker.changed.wait()

    # -- reconcile ---------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while True:
            # A fresh event before acting: a poke during _reconcile is never lost.
            self._wake = anyio.Event()
            self._reconcile(self._now())
            deadline = self._next_deadline()
            if deadline is None:
                await self._wake.wait()
            else:
                with anyio.move_on_after(max(0.0, deadline - self._now())):
                    await self._wake.wait()

    def _poke(self) -> None:
        self._wake.set()

    def _worker_changed(self, worker: Worker) -> None:
        """Wake everyone waiting on a worker state change (stop, rolls, tests)."""
        worker.notify_changed()
        self._changed.set()
        self._changed = anyio.Event()

    def _next_deadline(self) -> float | None:
        """Earliest timer of the workers :meth:`_reconcile` ticks (None: wait for events)."""
        if self._stopping:
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

    def _all_workers(self) -> list[Worker]:
        return [w for rt in self.agents.values() for w in rt.workers.values()]

    def _reconcile(self, now: float) -> None:
        if self._stopping:
            return
        for layer_index, layer in enumerate(self.layers):
            for name in layer:
                runtime = self.agents.get(name)
                if runtime is None:
                    continue
                if not runtime.gate_open and self._dependencies_ready(runtime):
                    runtime.gate_open = True
                    if layer_index:
                        log.info("agent dependencies ready", agent=name)
                if runtime.gate_open and runtime.enabled:
                    self._scale(runtime, now)
                for worker in list(runtime.workers.values()):
                    self._tick_worker(runtime, worker, now)
        self._update_ready()

    def _dependencies_ready(self, runtime: AgentRuntime) -> bool:
        """Every agent named in ``after`` has its desired ready workers.

        An agent scaled to 0 replicas (or removed) is satisfied: nothing of it
        will ever become ready, and waiting for it would block dependents forever.
        """
        for dep in runtime.config.after:
            other = self.agents.get(dep)
            if other is None or other.desired == 0:
                continue
            if len(other.ready_workers()) < other.desired:
                return False
        return True

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
                self._add_worker(runtime, slot, now)
        elif len(active) > runtime.desired:
            for worker in sorted(active, key=lambda w: w.slot)[runtime.desired :]:
                worker.retired = True
                self._stop_worker(worker, CAUSE_STOP)
        # Workers retired and stopped leave the table.
        for slot, worker in list(runtime.workers.items()):
            if worker.retired and not worker.lifecycle.running:
                del runtime.workers[slot]

    def _add_worker(self, runtime: AgentRuntime, slot: int, now: float) -> Worker:
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
                self._spawn(runtime, worker, now)
            else:  # not wanted any more: leave backoff for stopped (no busy timer)
                worker.lifecycle.on_stop_requested(CAUSE_STOP)
                self._worker_changed(worker)
        elif action.kind == "ready":
            self._mark_ready(runtime, worker, now)
        elif action.kind == "kill":
            log.warning(
                "worker unresponsive",
                agent=runtime.name,
                worker=worker.key,
                pid=worker.pid,
                cause=action.cause,
            )
            self._stop_worker(worker, action.cause or CAUSE_WATCHDOG, kill=True)

    # -- workers ----------------------------------------------------------------------------
    def _worker_env(self, runtime: AgentRuntime, worker: Worker, consumer: str) -> dict[str, str]:
        agent = runtime.config
        assert self._notify is not None and self.redis_url is not None
        env = dict(self._base_env)
        env.update(
            {
                "AG1_AGENT": agent.name,
                "AG1_WORKER": worker.key,
                "AG1_GROUP": agent.group,
                "AG1_CONSUMER": consumer,
                "AG1_STREAMS": ",".join(agent.read_streams),
                "REDIS_URL": self.redis_url,
                "BUS_NAMESPACE": self.config.redis.namespace,
                "NOTIFY_SOCKET": self._notify.address,
                "PYTHONUNBUFFERED": "1",
                "AG1_SUPERVISOR_PID": str(os.getpid()),
            }
        )
        working_dir = agent.working_dir or self.config.config_dir
        env["AG1_WORKING_DIR"] = str(working_dir)
        if agent.watchdog:
            env["AG1_WATCHDOG_USEC"] = str(int(agent.watchdog * 1e6))
        if agent.kind == "handler":
            env.update(
                {
                    "AG1_HANDLER": agent.handler,
                    "AG1_CONCURRENCY": str(agent.concurrency),
                    "AG1_COUNT": str(agent.count),
                    "AG1_MAX_DELIVERIES": str(agent.max_deliveries),
                    "AG1_DLQ": agent.dlq_stream,
                    # Leave a margin under stop_timeout so acks land before SIGKILL.
                    "AG1_DRAIN_TIMEOUT": f"{max(agent.stop_timeout * 0.8, 0.1):g}",
                }
            )
            if agent.ordered:
                env.update(
                    {
                        "AG1_ORDERED": "1",
                        "AG1_SHARDS": str(agent.shards),
                        "AG1_BASE_STREAMS": ",".join(agent.streams),
                    }
                )
        env.update(agent.env)
        return env

    def _argv(self, runtime: AgentRuntime) -> list[str]:
        agent = runtime.config
        if agent.kind == "handler":
            return [sys.executable, "-m", "supervisor.worker"]
        return list(agent.command)

    def _spawn(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        if self._stopping or self._tg is None:
            return
        agent = runtime.config
        consumer = f"{self.supervisor_name}:{agent.name}:{worker.slot}:{self._ids.next()}"
        env = self._worker_env(runtime, worker, consumer)
        cwd = agent.working_dir or self.config.config_dir
        worker.kill_cause = None
        worker.consumer = consumer
        worker.stats = None
        worker.status_text = None
        worker.usage = None
        worker.lifecycle.policy = runtime.policy
        worker.lifecycle.on_spawned(now)
        try:
            process = ChildProcess.spawn(
                self._argv(runtime),
                env=env,
                cwd=cwd,
                # Our worker arms its parent-death signal itself (the spawn can vfork).
                pdeathsig="child" if agent.kind == "handler" else True,
            )
        except OSError as exc:
            reason = f"spawn failed: {exc.strerror or exc}"
            log.error("worker spawn failed", agent=agent.name, worker=worker.key, error=reason)
            state = worker.lifecycle.on_exit(now, ExitInfo(code=127, reason=reason))
            runtime.exits_by_reason[reason] += 1
            runtime.last_start_error = f"{worker.key}: {reason}"
            worker.consumer = None
            self._after_exit_state(runtime, worker, state)
            return
        worker.process = process
        worker.started_wall = time.time()
        self._senders.add(process.pid, worker.key)
        log.info(
            "worker started",
            agent=agent.name,
            worker=worker.key,
            pid=process.pid,
            consumer=consumer,
        )
        self._worker_changed(worker)
        assert self._tg is not None
        self._tg.start_soon(self._watch, runtime, worker, process)

    async def _watch(self, runtime: AgentRuntime, worker: Worker, process: ChildProcess) -> None:
        """Own one child: capture its output, notice its exit at once, reap it."""
        fields: dict[str, Any] = {"agent": runtime.name, "worker": worker.key, "pid": process.pid}
        bucket = TokenBucket(rate=200.0, burst=1000.0)
        async with process, anyio.create_task_group() as tg:
            for fd, stream in ((process.stdout_fd, "stdout"), (process.stderr_fd, "stderr")):
                if fd is not None:
                    capture = LineCapture(fd, stream, bucket, worker.capture, fields=fields)
                    tg.start_soon(capture.run)
            status = await process.wait()
            process.kill_leftovers()
            self._on_exit(runtime, worker, process, status)
            tg.cancel_scope.deadline = anyio.current_time() + OUTPUT_GRACE

    def _exit_reason(self, worker: Worker, process: ChildProcess, status: ExitStatus) -> str:
        if worker.kill_cause in (CAUSE_WATCHDOG, CAUSE_MEMORY, CAUSE_START_TIMEOUT):
            return worker.kill_cause
        return status.describe(we_sent_kill=process.sent_kill)

    def _on_exit(
        self, runtime: AgentRuntime, worker: Worker, process: ChildProcess, status: ExitStatus
    ) -> None:
        now = self._now()
        self._senders.remove(process.pid)
        reason = self._exit_reason(worker, process, status)
        was_ready = worker.lifecycle.ready_at is not None
        state = worker.lifecycle.on_exit(
            now, ExitInfo(status.code, status.signal, worker.kill_cause, reason)
        )
        runtime.exits_by_reason[reason] += 1
        if worker.stats is not None:
            stats = worker.stats
            stats.in_flight = 0
            runtime.totals.merge(stats)
            worker.stats = None
        fields = {
            "agent": runtime.name,
            "worker": worker.key,
            "pid": process.pid,
            "reason": reason,
            "next": str(state),
        }
        expected = worker.lifecycle.stop_cause in (CAUSE_STOP, CAUSE_RESTART) or (
            status.code == 0 and worker.kill_cause is None
        )
        if not was_ready and not expected:
            runtime.last_start_error = f"{worker.key} failed to start: {reason}"
            log.warning("worker failed to start", **fields)
        elif expected:
            log.info("worker exited", **fields)
        else:
            log.warning("worker exited", **fields)
        if state == WorkerState.FATAL:
            log.error(
                "worker fatal",
                agent=runtime.name,
                worker=worker.key,
                why=worker.lifecycle.fatal_reason,
            )
        dead = worker.consumer
        if dead is not None and self._tg is not None:
            self._tg.start_soon(self._reclaim, runtime, dead)
        self._after_exit_state(runtime, worker, state)

    def _after_exit_state(self, runtime: AgentRuntime, worker: Worker, state: WorkerState) -> None:
        if state == WorkerState.BACKOFF:
            runtime.restarts_total += 1
        self._worker_changed(worker)
        self._poke()

    def _stop_worker(self, worker: Worker, cause: str, kill: bool = False) -> None:
        """Ask a worker to stop (SIGTERM, SIGKILL after stop_timeout; ``kill``: at once)."""
        process = worker.process
        if not worker.lifecycle.on_stop_requested(cause):
            self._worker_changed(worker)
            self._poke()
            return
        if worker.kill_cause is None or cause in (CAUSE_WATCHDOG, CAUSE_START_TIMEOUT):
            worker.kill_cause = cause
        self._worker_changed(worker)
        if process is None or process.exit_status is not None or self._tg is None:
            return
        if kill or self._force_stop:
            process.signal_group(signal.SIGKILL)
            return
        timeout = float(self.agents[worker.agent].config.stop_timeout)
        self._tg.start_soon(process.stop, timeout)

    def _mark_ready(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        if not worker.lifecycle.on_ready(now):
            return
        log.info("worker ready", agent=runtime.name, worker=worker.key, pid=worker.pid)
        runtime.last_start_error = None
        self._worker_changed(worker)
        if self._tg is not None and worker.consumer is not None:
            if runtime.orphans:
                orphans, runtime.orphans = runtime.orphans, []
                for consumer in orphans:
                    self._tg.start_soon(self._reclaim, runtime, consumer)
            if not runtime.stale_cleaned:
                runtime.stale_cleaned = True
                self._tg.start_soon(self._cleanup_stale, runtime)
        self._poke()

    # -- notify ------------------------------------------------------------------------------
    def _on_notify(self, message: NotifyMessage) -> None:
        key = self._senders.resolve_message(message)
        if key is None:
            log.debug("notify from unknown sender", pid=message.pid)
            return
        name, _, slot_text = key.rpartition("/")
        runtime = self.agents.get(name)
        worker = runtime.workers.get(int(slot_text)) if runtime is not None else None
        if runtime is None or worker is None:
            return
        now = self._now()
        if message.status is not None:
            worker.status_text = message.status
        if message.stats is not None:
            with contextlib.suppress(ValueError, TypeError):
                worker.stats = SubscriptionStats.from_dict(json.loads(message.stats))
        if message.watchdog:
            worker.lifecycle.on_heartbeat(now)
        if message.ready:
            self._mark_ready(runtime, worker, now)
        if message.stopping:
            log.info("worker stopping", agent=name, worker=key, pid=worker.pid)

    # -- delivery ------------------------------------------------------------------------------
    async def _reclaim(self, runtime: AgentRuntime, dead_consumer: str) -> None:
        if self._delivery is not None:
            await self._delivery.reclaim(runtime, dead_consumer)

    async def _cleanup_stale(self, runtime: AgentRuntime) -> None:
        if self._delivery is None:
            return
        running = {
            w.consumer
            for rt in self.agents.values()
            for w in rt.workers.values()
            if w.consumer and w.lifecycle.running
        }
        await self._delivery.cleanup_stale(runtime, running)

    async def _sweep_loop(self) -> None:
        if self._delivery is None:
            return
        while True:
            base = float(self.config.supervisor.sweep_interval)
            await anyio.sleep(self._delivery.sweep_period(self.agents.values(), base))
            await self._delivery.sweep_due(self.agents.values(), self._now(), base)

    # -- sampling ----------------------------------------------------------------------------
    async def _sample_loop(self) -> None:
        while True:
            await self._sample_once()
            await anyio.sleep(self.sample_interval)

    async def _sample_once(self) -> None:
        workers = [w for w in self._all_workers() if w.pid is not None]
        roots = [w.pid for w in workers if w.pid is not None]
        try:
            usage = await anyio.to_thread.run_sync(self._sampler.sample, roots)
        except Exception as exc:  # psutil on a vanished /proc entry etc.
            log.debug("resource sample failed", error=str(exc))
            usage = {}
        for worker in workers:
            if worker.pid is None:
                continue
            worker.usage = usage.get(worker.pid)
            limit = self.agents[worker.agent].config.memory_limit
            if (
                limit
                and worker.usage is not None
                and worker.usage.rss_bytes > limit
                and worker.lifecycle.state == WorkerState.READY
            ):
                log.warning(
                    "worker over memory limit",
                    agent=worker.agent,
                    worker=worker.key,
                    pid=worker.pid,
                    rss_bytes=worker.usage.rss_bytes,
                    limit_bytes=limit,
                )
                self._stop_worker(worker, CAUSE_MEMORY)
        await self._sample_redis()
        self._update_status()

    async def _sample_redis(self) -> None:
        groups: list[GroupSnapshot] = []
        try:
            with anyio.fail_after(REDIS_TIMEOUT):
                await self._redis.ping()
                if self._delivery is not None:
                    for runtime in self.agents.values():
                        groups.extend(await self._delivery.group_stats(runtime))
            self.redis_up = True
            self.redis_error = None
        except Exception as exc:
            self.redis_up = False
            self.redis_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        self._groups = groups

    # -- systemd ---------------------------------------------------------------------------
    def _update_ready(self) -> None:
        if not self.ready and self._plan_up():
            self.ready = True
            log.info("fleet ready", agents=len(self.agents))
            self._systemd.send("READY=1", f"STATUS={self._summary()}")
            self._status_line = self._summary()
        elif self.ready:
            self._update_status()

    def _plan_up(self) -> bool:
        for runtime in self.agents.values():
            if not runtime.enabled:
                continue
            if not runtime.gate_open:
                if self._blocked_by_fatal(runtime, set()):
                    continue  # waits on a fatal agent: as settled as it gets
                return False
            ready = len(runtime.ready_workers())
            fatal = any(w.lifecycle.state == WorkerState.FATAL for w in runtime.workers.values())
            if ready < runtime.desired and not fatal:
                return False
        return True

    def _blocked_by_fatal(self, runtime: AgentRuntime, seen: set[str]) -> bool:
        for dep in runtime.config.after:
            other = self.agents.get(dep)
            if other is None or dep in seen:
                continue
            seen.add(dep)
            if agent_state(other) == "fatal" or self._blocked_by_fatal(other, seen):
                return True
        return False

    def _summary(self) -> str:
        total = sum(rt.desired for rt in self.agents.values())
        ready = sum(len(rt.ready_workers()) for rt in self.agents.values())
        fatal = [rt.name for rt in self.agents.values() if agent_state(rt) == "fatal"]
        text = f"{ready}/{total} workers ready in {len(self.agents)} agents"
        if fatal:
            text += f"; fatal: {', '.join(sorted(fatal))}"
        return text

    def _update_status(self) -> None:
        summary = self._summary()
        if self.ready and summary != self._status_line:
            self._status_line = summary
            self._systemd.send(f"STATUS={summary}")

    async def _systemd_watchdog_loop(self, interval: float) -> None:
        while True:
            self._systemd.send("WATCHDOG=1")
            await anyio.sleep(interval)

    # -- FleetControl ------------------------------------------------------------------------
    def snapshot(self) -> FleetSnapshot:
        now = self._now()
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
            redis_up=self.redis_up,
            redis_error=self.redis_error,
            agents=agents,
            groups=list(self._groups),
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
            await self._roll(runtime)
            return
        now = self._now()
        for worker in list(runtime.workers.values()):
            if worker.lifecycle.running:
                self._stop_worker(worker, CAUSE_RESTART)
            else:
                worker.lifecycle.request_start(now)
        self._poke()

    async def scale_agent(self, name: str, replicas: int) -> None:
        if replicas < 0:
            raise ControlError("replicas must be >= 0")
        runtime = self._runtime(name)
        log.info("scaling agent", agent=name, replicas=replicas, previous=runtime.desired)
        runtime.desired = replicas
        self._poke()

    async def stop_agent(self, name: str) -> None:
        """Stop an agent's workers (drain) and keep them stopped until start_agent."""
        runtime = self._runtime(name)
        runtime.enabled = False
        async with anyio.create_task_group() as tg:
            for worker in list(runtime.workers.values()):
                tg.start_soon(self._stop_and_wait, worker, CAUSE_STOP)
        self._poke()

    async def start_agent(self, name: str) -> None:
        """Start a stopped agent, or clear fatal workers so they are tried again."""
        runtime = self._runtime(name)
        runtime.enabled = True
        now = self._now()
        for worker in runtime.workers.values():
            if not worker.lifecycle.running:
                worker.lifecycle.request_start(now)
        self._poke()

    async def reload(self) -> ReloadResult:
        """Re-read the config file and apply the difference (see :mod:`supervisor.reload`)."""
        return await self._reload()

    # -- rolling restart -------------------------------------------------------------------
    async def _roll(self, runtime: AgentRuntime) -> None:
        if runtime.rolling:
            raise ControlError(f"agent {runtime.name!r}: a rolling restart is already running")
        if self._stopping:
            raise ControlError("the supervisor is stopping")
        runtime.rolling = True
        runtime.last_roll_error = None
        try:
            await self._roll_workers(runtime)
        finally:
            runtime.rolling = False
            self._poke()

    async def _roll_workers(self, runtime: AgentRuntime) -> None:
        agent = runtime.config
        old = sorted(runtime.active(), key=lambda w: w.slot)
        surge = max(int(agent.max_surge), 0)
        batch = surge if surge > 0 else max(int(agent.max_unavailable), 1)
        log.info("rolling restart", agent=runtime.name, workers=len(old), batch=batch)
        for i in range(0, len(old), batch):
            if self._stopping:
                raise ControlError("rolling restart interrupted: the supervisor is stopping")
            await self._roll_batch(runtime, old[i : i + batch], surge_first=surge > 0)
        log.info("rolling restart done", agent=runtime.name)

    async def _retire_all(self, workers: list[Worker]) -> None:
        async with anyio.create_task_group() as tg:
            for worker in workers:
                worker.retired = True
                tg.start_soon(self._stop_and_wait, worker, CAUSE_STOP)

    async def _roll_batch(
        self, runtime: AgentRuntime, group: list[Worker], *, surge_first: bool
    ) -> None:
        """Replace ``group``: replacements first (surge) or, without surge, old ones first."""
        if not surge_first:
            await self._retire_all(group)
        now = self._now()
        used = set(runtime.workers)
        fresh: list[Worker] = []
        slot = 0
        for _ in group:
            while slot in used:
                slot += 1
            used.add(slot)
            worker = self._add_worker(runtime, slot, now)
            fresh.append(worker)
            self._spawn(runtime, worker, now)
        if not await self._wait_ready(fresh, float(runtime.config.start_timeout)):
            self._abort_roll(runtime, group, fresh)
        if surge_first:
            await self._retire_all(group)
        for worker in group:
            if not worker.lifecycle.running:
                runtime.workers.pop(worker.slot, None)

    def _abort_roll(self, runtime: AgentRuntime, old: list[Worker], fresh: list[Worker]) -> None:
        """Drop the replacements, keep (or bring back) the old workers, report; raises."""
        for worker in fresh:
            worker.retired = True
            self._stop_worker(worker, CAUSE_STOP)
        now = self._now()
        for worker in old:
            worker.retired = False
            if not worker.lifecycle.running:
                worker.lifecycle.request_start(now)
        exits = [f"{w.key}: {w.lifecycle.last_exit.reason}" for w in fresh if w.lifecycle.last_exit]
        runtime.last_roll_error = (
            f"rolling restart of {runtime.name} stopped: a replacement did not become "
            f"ready within {runtime.config.start_timeout:g}s"
            + (f" ({'; '.join(exits)})" if exits else "")
        )
        log.error("rolling restart failed", agent=runtime.name, error=runtime.last_roll_error)
        raise ControlError(runtime.last_roll_error)

    async def _wait_ready(self, workers: list[Worker], deadline: float) -> bool:
        """True once every worker is READY; False on a failed start or after ``deadline`` s."""
        with anyio.move_on_after(deadline):
            while True:
                states = [w.lifecycle.state for w in workers]
                if all(s == WorkerState.READY for s in states):
                    return True
                if any(w.lifecycle.last_exit is not None for w in workers):
                    return False
                await self._changed.wait()
        return False

    # -- reload ------------------------------------------------------------------------------
    async def _reload(self) -> ReloadResult:
        """Load, validate and diff the config; keep the old plan when it is invalid."""
        if self._config_loader is None:
            raise ControlError("reload is not available: no config loader")
        async with self._reload_lock:  # SIGHUP twice, or SIGHUP and the API: one at a time
            self._systemd.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                return await self._reload_inner()
            finally:
                self._systemd.send("READY=1", f"STATUS={self._summary()}")

    async def _reload_inner(self) -> ReloadResult:
        self.last_reload_at = time.time()
        loader = self._config_loader
        assert loader is not None
        try:
            new_config = await anyio.to_thread.run_sync(loader, Path(self.config.path))
        except Exception as exc:
            problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
            self.last_reload_error = "; ".join(problems)
            log.error("reload rejected", errors=problems, config=str(self.config.path))
            return ReloadResult(ok=False, errors=problems)
        from supervisor.plan import build_plan

        # Compare with the sections the running supervisor keeps, so a changed
        # [redis] url (which needs a restart) does not mark every agent changed.
        merged = _keep_supervisor_sections(self.config, new_config)
        diff = self.plan.diff(build_plan(merged))
        restart_required = restart_sections_changed(self.config, new_config)
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
        old_agents = {a.name: a for a in self.config.agents}
        new_agents = {a.name: a for a in new_config.agents}
        self._apply_config(merged)
        errors: list[str] = []
        async with anyio.create_task_group() as tg:
            for name in diff.removed:
                tg.start_soon(self._remove_agent, name)
        for name in diff.added:
            self.agents[name] = AgentRuntime(new_agents[name], desired=new_agents[name].replicas)
        for name in diff.scaled + diff.unchanged:
            runtime = self.agents[name]
            runtime.config = new_agents[name]
            if old_agents[name].replicas != new_agents[name].replicas:
                runtime.desired = new_agents[name].replicas
        self._poke()

        async def roll(name: str) -> None:
            runtime = self.agents[name]
            runtime.config = new_agents[name]
            try:
                await self._roll(runtime)
            except ControlError as exc:
                errors.append(str(exc))
            runtime.desired = new_agents[name].replicas
            self._poke()

        async with anyio.create_task_group() as tg:
            for name in diff.changed:
                tg.start_soon(roll, name)
        self.last_reload_error = "; ".join(errors) if errors else None
        return ReloadResult(
            ok=not errors,
            errors=errors,
            restart_required=restart_required,
            added=diff.added,
            removed=diff.removed,
            changed=diff.changed,
            scaled=diff.scaled,
            unchanged=diff.unchanged,
        )

    async def _remove_agent(self, name: str) -> None:
        runtime = self.agents.get(name)
        if runtime is None:
            return
        await self.stop_agent(name)
        self.agents.pop(name, None)
        log.info("agent removed", agent=name)


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


def _keep_supervisor_sections(old: Any, new: Any) -> Any:
    """The new agents with the running supervisor/redis/http sections (those need a restart)."""
    try:
        return new.model_copy(
            update={"supervisor": old.supervisor, "redis": old.redis, "http": old.http}
        )
    except AttributeError:  # pragma: no cover - non-pydantic test doubles
        return new


def _systemd_watchdog_interval(environ: dict[str, str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


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
