"""Worker processes of the worker table: spawn, watch, stop, notify dispatch.

:class:`WorkerRunner` owns the child side of a :class:`supervisor.runtime.records.Worker`:
it spawns the process for a slot, awaits the child's exit in a task of the
daemon's task group (capturing its output), records the exit and hands the dead
consumer's pending entries to :class:`supervisor.delivery.hooks.DeliveryHooks`,
stops workers with the SIGTERM → SIGKILL escalation, and applies the messages
workers send on the notify socket. *When* to spawn or stop is the reconcile
loop's decision (:mod:`supervisor.fleet.reconciler`); this module only carries it
out, records what happened through the :class:`~supervisor.runtime.table.WorkerTable`
(the table's one writer) and pokes the loop whenever a worker changed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from core_bus.consume.stats import SubscriptionStats
from core_bus.keys import WorkerConsumer
from core_bus.log import get_logger
from supervisor.delivery.group_target import REASON_CRASH, REASON_EXIT
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.runtime.exits import exit_reason
from supervisor.runtime.lifecycle import (
    CAUSE_START_TIMEOUT,
    CAUSE_STOP,
    CAUSE_STUCK,
    CAUSE_WATCHDOG,
    WorkerState,
)
from supervisor.runtime.logcapture import LineCapture, TokenBucket
from supervisor.runtime.notify import NotifyMessage, SenderIndex
from supervisor.runtime.process import ChildProcess, ExitStatus
from supervisor.runtime.table import AgentRuntime, IncarnationIds, Worker, WorkerTable
from supervisor.runtime.worker_env import FleetContext, worker_argv, worker_environment, working_dir

# The daemon's logger: these events were always the daemon's and keep its name.
log = get_logger("supervisor.fleet.daemon")

#: Seconds the log readers of an exited child may still drain its pipes.
OUTPUT_GRACE = 1.0


class WorkerRunner:
    """Carries out spawn/stop for the worker table and reports changes back.

    ``table`` is the worker table, ``poke`` wakes the reconcile loop and ``fleet_context`` gives the
    environment every child inherits. Until :meth:`bind` hands over the task
    group (and after :meth:`unbind`) nothing is spawned or signalled.
    """

    def __init__(
        self,
        table: WorkerTable,
        *,
        poke: Callable[[], None],
        fleet_context: Callable[[], FleetContext],
    ) -> None:
        self._table = table
        self._poke = poke
        self._fleet_context = fleet_context
        self._senders = SenderIndex()
        self._captures: dict[int, list[LineCapture]] = {}  # pid -> its output readers
        self._ids = IncarnationIds()
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._delivery: DeliveryHooks | None = None
        self._drain_notify: Callable[[], list[NotifyMessage]] | None = None
        self._supervisor_name = ""
        #: Set once the supervisor stops: nothing new is spawned.
        self.stopping = False
        #: Set by a forced stop: every stop is SIGKILL at once.
        self.force_stop = False

    def bind(
        self,
        tg: anyio.abc.TaskGroup,
        *,
        supervisor_name: str,
        delivery: DeliveryHooks,
        drain_notify: Callable[[], list[NotifyMessage]] | None = None,
    ) -> None:
        """Start owning children: their watchers and stops run in ``tg``.

        ``drain_notify`` reads datagrams queued on the notify socket; an exit
        applies them first (a worker's last word, e.g. the suspect it ran).
        """
        self._tg = tg
        self._drain_notify = drain_notify
        self._supervisor_name = supervisor_name
        self._delivery = delivery

    def unbind(self) -> None:
        self._tg = None

    def all_workers(self) -> list[Worker]:
        return self._table.all_workers()

    def poke(self) -> None:
        """Wake the reconcile loop."""
        self._poke()

    def now(self) -> float:
        return anyio.current_time()

    def begin_stop(self, force: bool) -> None:
        """The supervisor is stopping; ``force`` SIGKILLs every running child now."""
        if force:
            self.force_stop = True
            for worker in self.all_workers():
                if worker.process is not None and worker.lifecycle.running:
                    worker.lifecycle.on_stop_requested(CAUSE_STOP)
                    worker.process.signal_group(signal.SIGKILL)
        self.stopping = True

    # -- change notification -------------------------------------------------------------
    def worker_changed(self, worker: Worker) -> None:
        """Wake everyone waiting on a worker state change (stop, rolls, tests)."""
        worker.notify_changed()
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        """Wait until any worker's state changes."""
        await self._changed.wait()

    # -- spawn and watch -----------------------------------------------------------------
    def spawn(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        if self.stopping or self._tg is None:
            return
        agent = runtime.config
        consumer = str(
            WorkerConsumer(self._supervisor_name, agent.name, worker.slot, self._ids.next())
        )
        self._table.spawning(runtime, worker, consumer, now)
        try:
            fleet = self._fleet_context()
            process = ChildProcess.spawn(
                worker_argv(agent),
                env=worker_environment(agent, fleet, worker.key, consumer),
                cwd=working_dir(agent, fleet),
                # Our worker arms its parent-death signal itself (the spawn can vfork).
                pdeathsig="child" if agent.kind == "handler" else True,
            )
        except Exception as exc:  # OSError, a NUL byte (ValueError), anything: this worker's
            # failed start, never the supervisor's end (the other agents keep running)
            self._table.spawn_failed(runtime, worker, now, exc)
            self._after_exit_state(worker)
            return
        self._table.spawned(worker, process, time.time())
        self._senders.add(process.pid, worker.key)
        log.info(
            "worker started",
            agent=agent.name,
            worker=worker.key,
            pid=process.pid,
            consumer=consumer,
        )
        self.worker_changed(worker)
        assert self._tg is not None
        if self._delivery is not None:
            self._tg.start_soon(self._delivery.record_consumer, runtime, consumer)
        self._tg.start_soon(self._watch, runtime, worker, process)

    async def _watch(self, runtime: AgentRuntime, worker: Worker, process: ChildProcess) -> None:
        """Own one child: capture its output, notice its exit at once, reap it."""
        fields: dict[str, Any] = {"agent": runtime.name, "worker": worker.key, "pid": process.pid}
        bucket = TokenBucket(rate=200.0, burst=1000.0)
        captures: list[LineCapture] = []
        self._captures[process.pid] = captures
        async with process, anyio.create_task_group() as tg:
            for fd, stream in ((process.stdout_fd, "stdout"), (process.stderr_fd, "stderr")):
                if fd is not None:
                    capture = LineCapture(fd, stream, bucket, worker.capture, fields=fields)
                    captures.append(capture)
                    tg.start_soon(capture.run)
            status = await process.wait()
            self._captures.pop(process.pid, None)
            process.kill_leftovers()
            for capture in captures:  # its last words decide the failed start's reason
                capture.drain_now()
            self._on_exit(runtime, worker, process, status)
            tg.cancel_scope.deadline = anyio.current_time() + OUTPUT_GRACE

    def _on_exit(
        self, runtime: AgentRuntime, worker: Worker, process: ChildProcess, status: ExitStatus
    ) -> None:
        if self._drain_notify is not None:
            for message in self._drain_notify():
                try:
                    self.on_notify(message)
                except Exception as exc:  # same rule as the notify server's loop
                    log.warning("notify handler failed", error=f"{type(exc).__name__}: {exc}")
        self._senders.remove(process.pid)
        reason = exit_reason(worker, status, we_sent_kill=process.sent_kill)
        self._table.exited(runtime, worker, anyio.current_time(), status, reason, process.pid)
        dead = worker.consumer
        if dead is not None and self._tg is not None:
            why = REASON_EXIT if status.code == 0 else REASON_CRASH  # a drain is no crash
            self._tg.start_soon(self._reclaim, runtime, dead, why, reason)
        self._after_exit_state(worker)

    def _after_exit_state(self, worker: Worker) -> None:
        self.worker_changed(worker)
        self._poke()

    # -- stop --------------------------------------------------------------------------------
    def stop(self, worker: Worker, cause: str, kill: bool = False) -> None:
        """Ask a worker to stop (SIGTERM, SIGKILL after stop_timeout; ``kill``: at once)."""
        process = worker.process
        if not worker.lifecycle.on_stop_requested(cause):
            self.worker_changed(worker)
            self._poke()
            return
        if worker.kill_cause is None or cause in (CAUSE_WATCHDOG, CAUSE_START_TIMEOUT):
            self._table.kill_cause(worker, cause)
        self.worker_changed(worker)
        if process is None or process.exit_status is not None or self._tg is None:
            return
        if kill or self.force_stop:
            process.signal_group(signal.SIGKILL)
            return
        runtime = self._table.get(worker.agent)
        timeout = float(runtime.config.stop_timeout) if runtime is not None else 10.0
        self._tg.start_soon(process.stop, timeout)

    def renumber(self, runtime: AgentRuntime, worker: Worker, slot: int) -> None:
        """Give a running worker another slot: its notify datagrams and output lines are
        attributed under the new key from now on (a roll's replacements, see rollout)."""
        old = worker.key
        self._table.renumber(runtime, worker, slot)
        pid = worker.pid
        if pid is not None:
            self._senders.add(pid, worker.key)
            for capture in self._captures.get(pid, ()):
                capture.fields["worker"] = worker.key
        log.info("worker renumbered", agent=runtime.name, worker=worker.key, was=old, pid=pid)
        self.worker_changed(worker)

    async def stop_and_wait(self, worker: Worker, cause: str) -> None:
        self.stop(worker, cause)
        while worker.lifecycle.running:
            await worker.changed.wait()

    # -- readiness and notify ----------------------------------------------------------------
    def mark_ready(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        """READY: reclaim the agent's orphans to it and clean stale consumers once."""
        if not self._table.ready(runtime, worker, now):
            return
        log.info("worker ready", agent=runtime.name, worker=worker.key, pid=worker.pid)
        self.worker_changed(worker)
        if self._tg is not None and worker.consumer is not None:
            for consumer in self._table.take_orphans(runtime):
                self._tg.start_soon(self._reclaim, runtime, consumer)
            if self._table.stale_cleanup_due(runtime):
                self._tg.start_soon(self._cleanup_stale, runtime)
        self._poke()

    def on_notify(self, message: NotifyMessage) -> None:
        """Apply one notify datagram (READY/STATUS/STATS/WATCHDOG/STOPPING) to its worker."""
        key = self._senders.resolve_message(message)
        if key is None:
            log.debug("notify from unknown sender", pid=message.pid)
            return
        found = self._table.worker_by_key(key)
        if found is None:
            return
        runtime, worker = found
        now = anyio.current_time()
        stats = None
        if message.stats is not None:
            with contextlib.suppress(ValueError, TypeError):
                stats = SubscriptionStats.from_dict(json.loads(message.stats))
        self._table.notified(
            worker, now, status=message.status, stats=stats, heartbeat=message.watchdog
        )
        if message.ready:
            self.mark_ready(runtime, worker, now)
        if message.stopping:
            log.info("worker stopping", agent=runtime.name, worker=key, pid=worker.pid)
        self._message_reports(runtime, worker, message)

    def _message_reports(
        self, runtime: AgentRuntime, worker: Worker, message: NotifyMessage
    ) -> None:
        """X_AG1_ISOLATING (the suspect run alone now) and X_AG1_STUCK (replace the worker)."""
        isolating = message.fields.get("X_AG1_ISOLATING")
        if isolating is not None:
            worker.isolating = isolating or None
        stuck = message.fields.get("X_AG1_STUCK")
        if stuck is None:
            return
        worker.stuck = int(stuck) if stuck.isdigit() else 0
        if worker.stuck and worker.lifecycle.state == WorkerState.READY:
            log.error(
                "worker replaced: handler stuck",
                agent=runtime.name,
                worker=worker.key,
                pid=worker.pid,
                stuck=worker.stuck,
            )
            self.stop(worker, CAUSE_STUCK, kill=True)

    # -- delivery ------------------------------------------------------------------------------
    async def _reclaim(
        self,
        runtime: AgentRuntime,
        dead_consumer: str,
        reason: str | None = None,
        exit_reason: str | None = None,
    ) -> None:
        if self._delivery is not None:
            await self._delivery.reclaim(runtime, dead_consumer, reason, exit_reason)

    async def _cleanup_stale(self, runtime: AgentRuntime) -> None:
        if self._delivery is None:
            return
        await self._delivery.cleanup_stale(runtime, self._table.running_consumers())
