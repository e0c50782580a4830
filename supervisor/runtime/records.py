"""The records of the worker table: one agent's and one worker's runtime state.

Plain data, written only by :class:`supervisor.runtime.table.WorkerTable`
(and, for a worker's process fields, by the runner through the table's
methods); everyone else reads.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import anyio

from core_bus.consume.stats import SubscriptionStats
from supervisor.config.models import AgentConfig
from supervisor.runtime.lifecycle import RestartPolicy, WorkerLifecycle, WorkerState
from supervisor.runtime.logcapture import CaptureStats
from supervisor.runtime.process import ChildProcess
from supervisor.runtime.resources import Usage


def base36(n: int) -> str:
    """``n >= 0`` in base 36 (short, sortable-by-length incarnation ids)."""
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
        self._base = base36(int(time.time() * 1000))
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._base}{base36(self._n)}"


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
    #: "<stream> <id>" of the crash suspect it runs alone now (X_AG1_ISOLATING)
    isolating: str | None = None
    #: handlers it reported stuck (X_AG1_STUCK)
    stuck: int = 0
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

    config: AgentConfig
    desired: int
    enabled: bool = True
    gate_open: bool = False
    rolling: bool = False
    workers: dict[int, Worker] = field(default_factory=dict)
    totals: SubscriptionStats = field(default_factory=SubscriptionStats)
    exits_by_reason: Counter[str] = field(default_factory=Counter)
    restarts_total: int = 0
    message_crashes: int = 0  # workers that died on a message (never toward fatal)
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
