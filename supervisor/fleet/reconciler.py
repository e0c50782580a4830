"""The reconcile loop: desired workers (plan, replicas, enabled) against observed ones.

One loop acts on each worker's next timer (backoff end, start deadline,
watchdog deadline) and sleeps until the earliest one or until an event (an
exit, READY, a control call) pokes it. Agents start layer by layer (``after``);
shutdown stops layers in reverse order. What changes is recorded in the
:class:`~supervisor.runtime.table.WorkerTable`; processes are the runner's.
"""

from __future__ import annotations

import anyio

from core_bus.log import get_logger
from supervisor.fleet.systemd_status import SystemdStatus
from supervisor.runtime.lifecycle import CAUSE_STOP, CAUSE_WATCHDOG
from supervisor.runtime.readiness import dependencies_ready
from supervisor.runtime.runner import WorkerRunner
from supervisor.runtime.table import AgentRuntime, Worker, WorkerTable

log = get_logger("supervisor.fleet.daemon")


class Reconciler:
    """Drives the table towards the plan (see the module docstring)."""

    def __init__(self, table: WorkerTable, runner: WorkerRunner, systemd: SystemdStatus) -> None:
        self._table = table
        self._runner = runner
        self._systemd = systemd
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Something changed: reconcile now."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            # A fresh event before acting: a poke during reconcile() is never lost.
            self._wake = anyio.Event()
            now = anyio.current_time()
            self.reconcile(now)
            deadline = self.next_deadline()
            if deadline is None:
                await self._wake.wait()
            else:
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await self._wake.wait()

    def next_deadline(self) -> float | None:
        """Earliest timer of the workers :meth:`reconcile` ticks (None: wait for events)."""
        if self._runner.stopping:
            return None
        known = [
            deadline
            for _layer, runtime in self._table.in_layers()
            for worker in runtime.workers.values()
            if (deadline := worker.lifecycle.next_deadline()) is not None
        ]
        return min(known) if known else None

    def reconcile(self, now: float) -> None:
        if self._runner.stopping:
            return
        for layer_index, runtime in self._table.in_layers():
            if not runtime.gate_open and dependencies_ready(self._table.agents, runtime):
                self._table.open_gate(runtime)
                if layer_index:
                    log.info("agent dependencies ready", agent=runtime.name)
            if runtime.gate_open and runtime.enabled:
                self._scale(runtime, now)
            for worker in list(runtime.workers.values()):
                self._tick_worker(runtime, worker, now)
        self._systemd.update(self._table.agents)

    def _scale(self, runtime: AgentRuntime, now: float) -> None:
        if runtime.rolling:
            return
        active = runtime.active()
        if len(active) < runtime.desired:
            for slot in self._table.free_slots(runtime, runtime.desired - len(active)):
                self._table.add_worker(runtime, slot, now)
        elif len(active) > runtime.desired:
            for worker in sorted(active, key=lambda w: w.slot)[runtime.desired :]:
                self._table.retire(worker)
                self._runner.stop(worker, CAUSE_STOP)
        self._table.prune_retired(runtime)

    def _tick_worker(self, runtime: AgentRuntime, worker: Worker, now: float) -> None:
        action = worker.lifecycle.tick(now)
        if action is None:
            return
        if action.kind == "spawn":
            if runtime.enabled and not worker.retired:
                self._runner.spawn(runtime, worker, now)
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
            self._runner.stop(worker, action.cause or CAUSE_WATCHDOG, kill=True)

    async def stop_all(self) -> None:
        """Stop layers in reverse start order; each layer's workers in parallel."""
        for layer in self._table.plan.stop_order():
            async with anyio.create_task_group() as tg:
                for name in layer:
                    runtime = self._table.get(name)
                    if runtime is None:
                        continue
                    self._table.set_enabled(runtime, False)
                    for worker in list(runtime.workers.values()):
                        tg.start_soon(self._runner.stop_and_wait, worker, CAUSE_STOP)
        # Agents added by a reload but not in a layer yet, and any stragglers.
        async with anyio.create_task_group() as tg:
            for worker in self._runner.all_workers():
                tg.start_soon(self._runner.stop_and_wait, worker, CAUSE_STOP)
