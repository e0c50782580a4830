"""Read-only view of the fleet, and the control interface the HTTP API drives.

The daemon builds a :class:`FleetSnapshot` on demand; the HTTP server, the
metrics collector and ``ag1-fleet status`` only ever read snapshots, so they
never reach into daemon internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from core_bus.consume.stats import SubscriptionStats


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


@dataclass
class GroupSnapshot:
    stream: str
    group: str
    pending: int | None = None
    lag: int | None = None  # None = unknown (XINFO GROUPS lag can be NULL)
    consumers: int | None = None


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
    agents: list[AgentSnapshot] = field(default_factory=list)
    groups: list[GroupSnapshot] = field(default_factory=list)
    last_reload_error: str | None = None
    last_reload_at: float | None = None
    ready: bool = False  # the first plan is up

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
