"""The worker table: the fleet's agents and workers, and its one writer.

:class:`WorkerTable` is the only code that changes which agents and workers
exist and what they are asked to be (desired replicas, enabled, rolling,
retired), and the only code that records what happened to a worker (spawned,
ready, heartbeat, exit, usage, orphaned consumers). The reconciler, the
controller, rollout, reload, the runner and the delivery hooks all write
through its methods; snapshots, readiness and metrics only read the records
(:mod:`supervisor.runtime.records`). Everything runs on the daemon's event
loop, so no locks.
"""

from __future__ import annotations

from collections.abc import Iterator

from core_bus.consume.stats import SubscriptionStats
from supervisor.config.models import AgentConfig, FleetConfig
from supervisor.config.plan import Plan, build_plan
from supervisor.runtime.exits import record_exit, record_spawn_failure
from supervisor.runtime.lifecycle import WorkerLifecycle, WorkerState
from supervisor.runtime.process import ChildProcess, ExitStatus
from supervisor.runtime.records import AgentRuntime, IncarnationIds, Worker
from supervisor.runtime.resources import Usage

__all__ = ["AgentRuntime", "IncarnationIds", "Worker", "WorkerTable"]


class WorkerTable:
    """Agents by name, their workers by slot, the plan they follow (see the module docstring)."""

    def __init__(self, config: FleetConfig) -> None:
        self.agents: dict[str, AgentRuntime] = {}
        self.config = config
        self.plan: Plan = build_plan(config)
        self.layers: list[list[str]] = self.plan.start_order()
        for agent in config.agents:
            self.add_agent(agent)

    # -- reads ---------------------------------------------------------------------------
    def get(self, name: str) -> AgentRuntime | None:
        return self.agents.get(name)

    def runtimes(self) -> list[AgentRuntime]:
        return list(self.agents.values())

    def all_workers(self) -> list[Worker]:
        return [w for rt in self.agents.values() for w in rt.workers.values()]

    def in_layers(self) -> Iterator[tuple[int, AgentRuntime]]:
        """Agents in start order with their layer index (agents not in the plan are skipped)."""
        for index, layer in enumerate(self.layers):
            for name in layer:
                runtime = self.agents.get(name)
                if runtime is not None:
                    yield index, runtime

    def running_consumers(self) -> set[str]:
        return {w.consumer for w in self.all_workers() if w.consumer and w.lifecycle.running}

    def worker_by_key(self, key: str) -> tuple[AgentRuntime, Worker] | None:
        name, _, slot_text = key.rpartition("/")
        runtime = self.agents.get(name)
        if runtime is None or not slot_text.isdigit():
            return None
        worker = runtime.workers.get(int(slot_text))
        return None if worker is None else (runtime, worker)

    # -- config and agents -------------------------------------------------------------------
    def apply_config(self, config: FleetConfig) -> None:
        """A new plan (reload); agents are added, changed and removed by the calls below."""
        self.config = config
        self.plan = build_plan(config)
        self.layers = self.plan.start_order()

    def add_agent(self, agent: AgentConfig) -> AgentRuntime:
        runtime = AgentRuntime(agent, desired=agent.replicas)
        self.agents[agent.name] = runtime
        return runtime

    def remove_agent(self, name: str) -> None:
        self.agents.pop(name, None)

    def set_agent_config(self, runtime: AgentRuntime, agent: AgentConfig) -> None:
        runtime.config = agent

    def set_desired(self, runtime: AgentRuntime, replicas: int) -> None:
        runtime.desired = replicas

    def set_enabled(self, runtime: AgentRuntime, enabled: bool) -> None:
        runtime.enabled = enabled

    def open_gate(self, runtime: AgentRuntime) -> None:
        runtime.gate_open = True

    def begin_roll(self, runtime: AgentRuntime) -> None:
        runtime.rolling = True
        runtime.last_roll_error = None

    def end_roll(self, runtime: AgentRuntime, error: str | None = None) -> None:
        runtime.rolling = False
        if error is not None:
            runtime.last_roll_error = error

    def roll_failed(self, runtime: AgentRuntime, error: str) -> None:
        runtime.last_roll_error = error

    # -- workers -----------------------------------------------------------------------------
    def free_slots(self, runtime: AgentRuntime, count: int) -> list[int]:
        """The ``count`` lowest slots not in use (contiguous once retired workers leave)."""
        used = set(runtime.workers)
        slots: list[int] = []
        slot = 0
        while len(slots) < count:
            if slot not in used:
                slots.append(slot)
            slot += 1
        return slots

    def add_worker(self, runtime: AgentRuntime, slot: int, now: float) -> Worker:
        lifecycle = WorkerLifecycle(runtime.policy)
        lifecycle.request_start(now)
        worker = Worker(runtime.name, slot, lifecycle)
        runtime.workers[slot] = worker
        return worker

    def renumber(self, runtime: AgentRuntime, worker: Worker, slot: int) -> None:
        """Move a worker to a free ``slot`` (its process keeps running)."""
        if slot in runtime.workers:
            raise ValueError(f"slot {slot} of {runtime.name} is taken")
        if runtime.workers.get(worker.slot) is worker:
            del runtime.workers[worker.slot]
        worker.slot = slot
        runtime.workers[slot] = worker

    def request_start(self, worker: Worker, now: float) -> None:
        """Start (again) a worker that is not running: backoff, stopped or fatal."""
        worker.lifecycle.request_start(now)

    def retire(self, worker: Worker, retired: bool = True) -> None:
        worker.retired = retired

    def drop_worker(self, runtime: AgentRuntime, worker: Worker) -> None:
        if runtime.workers.get(worker.slot) is worker:
            del runtime.workers[worker.slot]

    def prune_retired(self, runtime: AgentRuntime) -> None:
        """Retired workers that stopped leave the table."""
        for worker in list(runtime.workers.values()):
            if worker.retired and not worker.lifecycle.running:
                self.drop_worker(runtime, worker)

    # -- what happened to a worker (the runner reports, the table records) -------------------
    def spawning(self, runtime: AgentRuntime, worker: Worker, consumer: str, now: float) -> None:
        worker.kill_cause = None
        worker.consumer = consumer
        worker.stats = None
        worker.status_text = None
        worker.usage = None
        worker.capture.last_error = None
        worker.lifecycle.policy = runtime.policy
        worker.lifecycle.on_spawned(now)

    def spawned(self, worker: Worker, process: ChildProcess, wall: float) -> None:
        worker.process = process
        worker.started_wall = wall

    def spawn_failed(
        self, runtime: AgentRuntime, worker: Worker, now: float, exc: Exception
    ) -> WorkerState:
        return self._after_exit(runtime, record_spawn_failure(runtime, worker, now, exc))

    def exited(
        self,
        runtime: AgentRuntime,
        worker: Worker,
        now: float,
        status: ExitStatus,
        reason: str,
        pid: int | None,
    ) -> WorkerState:
        return self._after_exit(runtime, record_exit(runtime, worker, now, status, reason, pid))

    def _after_exit(self, runtime: AgentRuntime, state: WorkerState) -> WorkerState:
        if state == WorkerState.BACKOFF:
            runtime.restarts_total += 1
        return state

    def kill_cause(self, worker: Worker, cause: str) -> None:
        worker.kill_cause = cause

    def ready(self, runtime: AgentRuntime, worker: Worker, now: float) -> bool:
        """READY arrived (or start_seconds passed); False if the lifecycle ignores it."""
        if not worker.lifecycle.on_ready(now):
            return False
        runtime.last_start_error = None
        return True

    def notified(
        self,
        worker: Worker,
        now: float,
        *,
        status: str | None,
        stats: SubscriptionStats | None,
        heartbeat: bool,
    ) -> None:
        if status is not None:
            worker.status_text = status
        if stats is not None:
            worker.stats = stats
        if heartbeat:
            worker.lifecycle.on_heartbeat(now)

    def sampled(self, worker: Worker, usage: Usage | None) -> None:
        worker.usage = usage

    # -- delivery bookkeeping -----------------------------------------------------------------
    def add_orphan(self, runtime: AgentRuntime, consumer: str) -> None:
        """A dead consumer whose entries wait for the agent's next ready worker."""
        if consumer not in runtime.orphans:
            runtime.orphans.append(consumer)

    def take_orphans(self, runtime: AgentRuntime) -> list[str]:
        orphans, runtime.orphans = runtime.orphans, []
        return orphans

    def stale_cleanup_due(self, runtime: AgentRuntime) -> bool:
        """True once per agent (and again after a failed cleanup)."""
        if runtime.stale_cleaned:
            return False
        runtime.stale_cleaned = True
        return True

    def stale_cleanup_failed(self, runtime: AgentRuntime) -> None:
        runtime.stale_cleaned = False

    def swept(self, runtime: AgentRuntime, now: float) -> None:
        runtime.last_sweep = now
