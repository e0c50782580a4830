"""The daemon's worker table: per-agent and per-worker runtime state, and its snapshots.

Plain data plus the pure conversion to :mod:`supervisor.fleet.snapshot` dataclasses;
no I/O. The daemon mutates these objects from its event loop only.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio

from core_bus.consume.stats import SubscriptionStats
from supervisor.fleet.snapshot import AgentSnapshot, GroupSnapshot, WorkerSnapshot
from supervisor.runtime.lifecycle import RestartPolicy, WorkerLifecycle, WorkerState
from supervisor.runtime.logcapture import CaptureStats
from supervisor.runtime.process import ChildProcess
from supervisor.runtime.resources import Usage


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class IncarnationIds:
    """Unique across supervisor runs: base36 milliseconds + a counter."""

    def __init__(self) -> None:
        self._base = _base36(int(time.time() * 1000))
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._base}{_base36(self._n)}"


@dataclass
class Worker:
    """One worker slot of an agent and its current incarnation."""

    agent: str
    slot: int
    lifecycle: WorkerLifecycle
    process: ChildProcess | None = None
    consumer: str | None = None
    started_wall: float | None = None
    status_text: str | None = None
    stats: SubscriptionStats | None = None
    usage: Usage | None = None
    kill_cause: str | None = None
    retired: bool = False  # remove once stopped (scale down, replaced by a roll)
    changed: anyio.Event = field(default_factory=anyio.Event)
    capture: CaptureStats = field(default_factory=CaptureStats)

    @property
    def key(self) -> str:
        return f"{self.agent}/{self.slot}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.lifecycle.running else None

    def notify_changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


@dataclass
class AgentRuntime:
    """Observed and desired state of one agent."""

    config: Any  # supervisor.config.models.AgentConfig
    desired: int
    enabled: bool = True
    gate_open: bool = False
    rolling: bool = False
    workers: dict[int, Worker] = field(default_factory=dict)
    totals: SubscriptionStats = field(default_factory=SubscriptionStats)
    exits_by_reason: Counter[str] = field(default_factory=Counter)
    restarts_total: int = 0
    orphans: list[str] = field(default_factory=list)
    stale_cleaned: bool = False
    last_sweep: float = 0.0
    last_roll_error: str | None = None
    #: The last spawn failure or exit before READY; cleared when a worker gets ready.
    last_start_error: str | None = None

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def policy(self) -> RestartPolicy:
        return RestartPolicy.from_agent(self.config)

    def active(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.retired]

    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.lifecycle.state == WorkerState.READY]

    def live_consumers(self, exclude: str | None = None) -> list[str]:
        return [
            w.consumer
            for w in self.ready_workers()
            if w.consumer is not None and w.consumer != exclude
        ]


def agent_state(runtime: AgentRuntime) -> str:
    """running | starting | degraded | stopped | fatal, as /status and /readyz show it."""
    if not runtime.enabled:
        return "stopped"
    if any(w.lifecycle.state == WorkerState.FATAL for w in runtime.workers.values()):
        return "fatal"
    ready = len(runtime.ready_workers())
    if ready >= runtime.desired:
        return "running" if runtime.desired else "stopped"
    if not runtime.gate_open:
        return "starting"
    if any(w.lifecycle.restarts for w in runtime.workers.values()):
        return "degraded"
    return "starting"


def dependencies_ready(agents: dict[str, AgentRuntime], runtime: AgentRuntime) -> bool:
    """Every agent named in ``after`` has its desired ready workers.

    An agent scaled to 0 replicas (or removed) is satisfied: nothing of it will
    ever become ready, and waiting for it would block dependents forever.
    """
    for dep in runtime.config.after:
        other = agents.get(dep)
        if other is None or other.desired == 0:
            continue
        if len(other.ready_workers()) < other.desired:
            return False
    return True


def blocked_by_fatal(
    agents: dict[str, AgentRuntime], runtime: AgentRuntime, seen: set[str] | None = None
) -> bool:
    """True when an agent ``runtime`` waits on (directly or not) is fatal."""
    seen = set() if seen is None else seen
    for dep in runtime.config.after:
        other = agents.get(dep)
        if other is None or dep in seen:
            continue
        seen.add(dep)
        if agent_state(other) == "fatal" or blocked_by_fatal(agents, other, seen):
            return True
    return False


def plan_up(agents: dict[str, AgentRuntime]) -> bool:
    """The plan is up: every enabled agent has its ready workers, or is as settled as
    it gets (fatal, or waiting on a fatal agent)."""
    for runtime in agents.values():
        if not runtime.enabled:
            continue
        if not runtime.gate_open:
            if blocked_by_fatal(agents, runtime):
                continue
            return False
        ready = len(runtime.ready_workers())
        fatal = any(w.lifecycle.state == WorkerState.FATAL for w in runtime.workers.values())
        if ready < runtime.desired and not fatal:
            return False
    return True


def fleet_summary(agents: dict[str, AgentRuntime]) -> str:
    """One line for systemd's STATUS=: ready/desired workers and fatal agents."""
    total = sum(rt.desired for rt in agents.values())
    ready = sum(len(rt.ready_workers()) for rt in agents.values())
    fatal = [rt.name for rt in agents.values() if agent_state(rt) == "fatal"]
    text = f"{ready}/{total} workers ready in {len(agents)} agents"
    if fatal:
        text += f"; fatal: {', '.join(sorted(fatal))}"
    return text


def worker_snapshot(runtime: AgentRuntime, worker: Worker, now: float) -> WorkerSnapshot:
    """One worker as the HTTP API shows it (``now``: the loop's monotonic clock)."""
    lc = worker.lifecycle
    running = lc.running
    stats = worker.stats
    heartbeat_age = None
    if running and lc.last_heartbeat is not None:
        heartbeat_age = max(0.0, now - lc.last_heartbeat)
    return WorkerSnapshot(
        agent=runtime.name,
        slot=worker.slot,
        worker_id=worker.key,
        state=str(lc.state),
        pid=worker.pid,
        consumer=worker.consumer if running else None,
        restarts=lc.restarts,
        last_exit=lc.last_exit.reason if lc.last_exit is not None else None,
        started_at=worker.started_wall if running else None,
        uptime_seconds=(now - lc.started_at) if running and lc.started_at is not None else None,
        last_heartbeat_age_seconds=heartbeat_age,
        rss_bytes=worker.usage.rss_bytes if running and worker.usage else None,
        cpu_percent=worker.usage.cpu_percent if running and worker.usage else None,
        in_flight=stats.in_flight if stats is not None and running else 0,
        status_text=lc.fatal_reason if lc.state == WorkerState.FATAL else worker.status_text,
    )


def agent_snapshot(runtime: AgentRuntime, now: float, counters: Any = None) -> AgentSnapshot:
    """One agent with its workers; message totals span every incarnation.

    ``counters`` are the rebalancer's counters for the agent (reclaims, dead
    letters written by the supervisor, deleted consumers), when there is one.
    """
    messages = SubscriptionStats()
    messages.merge(runtime.totals)
    for worker in runtime.workers.values():
        if worker.stats is not None:
            messages.merge(worker.stats)
    if counters is not None:
        messages.dead_lettered += int(getattr(counters, "dead_lettered", 0))
    return AgentSnapshot(
        name=runtime.name,
        group=runtime.config.group,
        streams=list(runtime.config.read_streams),
        desired_replicas=runtime.desired if runtime.enabled else 0,
        ready_replicas=len(runtime.ready_workers()),
        state=agent_state(runtime),
        workers=[
            worker_snapshot(runtime, w, now)
            for w in sorted(runtime.workers.values(), key=lambda w: w.slot)
        ],
        restarts_total=runtime.restarts_total,
        exits_by_reason=dict(runtime.exits_by_reason),
        messages=messages,
        reclaimed_by_reason=dict(getattr(counters, "reclaimed_by_reason", {}) or {}),
        deleted_consumers_total=int(getattr(counters, "deleted_consumers", 0)),
        rolling=runtime.rolling,
        last_error=agent_error(runtime),
    )


def agent_error(runtime: AgentRuntime) -> str | None:
    """The most pressing reason the agent is not as asked: fatal, failed roll, failed start."""
    for worker in sorted(runtime.workers.values(), key=lambda w: w.slot):
        if worker.lifecycle.state == WorkerState.FATAL:
            return f"{worker.key} fatal: {worker.lifecycle.fatal_reason}"
    return runtime.last_roll_error or runtime.last_start_error


def group_snapshot(stat: Any, group: str) -> GroupSnapshot:
    lag = getattr(stat, "lag", None)
    if isinstance(lag, float) and math.isnan(lag):
        lag = None
    return GroupSnapshot(
        stream=str(getattr(stat, "stream", "")),
        group=str(getattr(stat, "group", group)),
        pending=getattr(stat, "pending", None),
        lag=lag,
        consumers=getattr(stat, "consumers", None),
    )
