"""Read-only view of the fleet, and the control interface the HTTP API drives.

The daemon builds a :class:`FleetSnapshot` on demand; the HTTP server, the
metrics collector and ``ag1-fleet status`` only ever read snapshots, so they
never reach into daemon internals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from core_bus.consume.stats import SubscriptionStats
from supervisor.runtime.lifecycle import WorkerState
from supervisor.runtime.readiness import agent_state, stalled_reason
from supervisor.runtime.records import AgentRuntime, Worker


@dataclass
class WorkerSnapshot:
    agent: str
    slot: int
    worker_id: str  # "echo/0"
    state: str  # starting | ready | stopping | exited | backoff | fatal | stopped
    pid: int | None = None
    consumer: str | None = None
    restarts: int = 0
    last_exit: str | None = None  # "exit 1", "signal SIGKILL (likely OOM kill)", ...
    started_at: float | None = None  # unix time
    uptime_seconds: float | None = None
    last_heartbeat_age_seconds: float | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    in_flight: int = 0
    status_text: str | None = None  # last STATUS= from the child
    last_error: str | None = None  # its last error line (stderr or an error-level event)


@dataclass
class GroupSnapshot:
    stream: str
    group: str
    pending: int | None = None
    lag: int | None = None  # None = unknown; counted when XINFO GROUPS lag is NULL/missing
    consumers: int | None = None
    lag_note: str | None = None  # why Redis gave no lag, and that it was counted instead


@dataclass
class AgentSnapshot:
    name: str
    group: str
    streams: list[str]
    desired_replicas: int
    ready_replicas: int
    state: str  # running | starting | degraded | stopped | fatal
    workers: list[WorkerSnapshot] = field(default_factory=list)
    restarts_total: int = 0
    exits_by_reason: dict[str, int] = field(default_factory=dict)  # reason -> count
    # Totals over every incarnation of every worker of the agent.
    messages: SubscriptionStats = field(default_factory=SubscriptionStats)
    reclaimed_by_reason: dict[str, int] = field(default_factory=dict)  # crash|idle|startup
    deleted_consumers_total: int = 0
    rolling: bool = False  # a rolling restart is in progress
    # Why the agent is not as asked: a fatal worker's reason, a failed rolling
    # restart (the API answered 202 before it ran), or the last failed start.
    last_error: str | None = None
    dlq_stream: str = ""
    # Entries in the dead-letter stream now (XLEN at the last sample); None = not sampled.
    # ``messages.dead_lettered`` counts only those written since this supervisor started.
    dlq_length: int | None = None
    # Stream patterns in ``streams`` -> how many existing streams they matched
    # (with the agent's group) when the supervisor last looked.
    patterns: dict[str, int] = field(default_factory=dict)


@dataclass
class FleetSnapshot:
    version: str
    supervisor_name: str
    started_at: float
    uptime_seconds: float
    config_path: str
    config_hash: str
    redis_url: str  # always redacted
    redis_up: bool
    redis_error: str | None = None
    config_file: str = ""  # config_path made absolute: what `ag1-fleet reload -c` compares
    #: standalone / sentinel / cluster, and the Redis as the logs name it (no secret):
    #: in sentinel mode redis_url's host is not used, ``redis`` names the sentinels
    redis_mode: str = "standalone"
    redis: str = ""
    agents: list[AgentSnapshot] = field(default_factory=list)
    groups: list[GroupSnapshot] = field(default_factory=list)
    # Groups of the namespace no supervisor's plan reads (a removed agent's group).
    orphan_groups: list[GroupSnapshot] = field(default_factory=list)
    last_reload_error: str | None = None
    last_reload_at: float | None = None
    ready: bool = False  # the first plan is up
    #: fleet membership as this supervisor sees it (supervisor.membership.service)
    membership: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnknownAgentError(LookupError):
    """The control request names an agent that is not in the plan."""


class ControlError(RuntimeError):
    """A control request could not be carried out (message is shown to the user)."""


@dataclass
class ReloadResult:
    ok: bool
    errors: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    scaled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # [supervisor]/[redis]/[http] changed: kept as they were until a restart.
    restart_required: list[str] = field(default_factory=list)


class FleetControl(Protocol):
    """What the HTTP control API and signal handlers may ask of the daemon."""

    def snapshot(self) -> FleetSnapshot: ...

    async def restart_agent(self, name: str, rolling: bool = False) -> None: ...

    async def scale_agent(self, name: str, replicas: int) -> None: ...

    async def stop_agent(self, name: str) -> None: ...

    async def start_agent(self, name: str) -> None: ...

    async def reload(self) -> ReloadResult: ...


# -- building snapshots from the worker table ------------------------------------


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
        last_error=worker.capture.last_error,
    )


def agent_snapshot(
    runtime: AgentRuntime,
    now: float,
    counters: Any = None,
    dlq_length: int | None = None,
    matched: dict[str, int] | None = None,
) -> AgentSnapshot:
    """One agent with its workers; message totals span every incarnation.

    ``counters`` are the rebalancer's counters for the agent (reclaims, dead
    letters written by the supervisor, deleted consumers), when there is one;
    ``matched`` how many streams each stream pattern matched.
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
        dlq_stream=runtime.config.dlq_stream,
        dlq_length=dlq_length,
        patterns={p: (matched or {}).get(p, 0) for p in runtime.config.stream_patterns},
    )


def agent_error(runtime: AgentRuntime) -> str | None:
    """The most pressing reason the agent is not as asked: fatal, failed roll, failed start."""
    for worker in sorted(runtime.workers.values(), key=lambda w: w.slot):
        if worker.lifecycle.state == WorkerState.FATAL:
            text = f"{worker.key} fatal: {worker.lifecycle.fatal_reason}"
            if runtime.last_start_error:  # "6 starts within 60s" alone does not say why
                text += f"; last: {runtime.last_start_error}"
            return text
    return stalled_reason(runtime) or runtime.last_roll_error or runtime.last_start_error


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
        lag_note=getattr(stat, "lag_note", None),
    )
