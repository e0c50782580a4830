"""Pure worker lifecycle: states, restart policy, backoff and start limit.

No I/O and no clock of its own: every method takes ``now`` (monotonic
seconds), so the whole policy is unit-testable with a fake clock. The daemon
feeds it events (spawned, ready, heartbeat, exit) and asks it what to do next
(:meth:`WorkerLifecycle.tick`).

States::

    starting -> ready -> stopping -> exited -> backoff -> starting ...
                                             \\-> fatal   (start limit hit; cleared by start_agent)
                                             \\-> stopped (not restarted: policy, or we stopped it)

Start limit (as PM2's min_uptime and systemd's StartLimitBurst): only
*unstable* restarts count toward ``start_limit`` — a worker that died before
READY, or within ``min_uptime`` of READY. A worker that ran stably and was
killed restarts with backoff but never goes fatal, and neither does one that
died on a message (it was running a crash suspect alone, or a handler was
stuck): that is the message's failure, handled by dead-lettering it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"
    BACKOFF = "backoff"
    FATAL = "fatal"
    STOPPED = "stopped"


#: Why we (not the child) ended a worker; recorded as its exit reason.
CAUSE_WATCHDOG = "watchdog"
CAUSE_MEMORY = "memory limit"
CAUSE_START_TIMEOUT = "start timeout"
CAUSE_STOP = "stop"  # stop requested: do not restart
CAUSE_RESTART = "restart"  # restart requested: restart without counting a failure
CAUSE_STUCK = "handler stuck"  # a handler ignored its cancellation: replaced

#: Causes that count as a failure of the worker.
FAILURE_CAUSES = frozenset({CAUSE_WATCHDOG, CAUSE_MEMORY, CAUSE_START_TIMEOUT, CAUSE_STUCK})


class AgentLike(Protocol):
    """The AgentConfig fields the policy reads (durations in seconds; read-only)."""

    @property
    def kind(self) -> str: ...

    @property
    def restart(self) -> str: ...

    @property
    def backoff_initial(self) -> float: ...

    @property
    def backoff_max(self) -> float: ...

    @property
    def backoff_reset_after(self) -> float: ...

    @property
    def start_limit(self) -> int: ...

    @property
    def start_limit_window(self) -> float: ...

    @property
    def start_timeout(self) -> float: ...

    @property
    def start_seconds(self) -> float: ...

    @property
    def success_exit_codes(self) -> list[int]: ...

    @property
    def watchdog(self) -> float | None: ...

    @property
    def min_uptime(self) -> float: ...


@dataclass(frozen=True)
class RestartPolicy:
    """What to do when a worker exits; built from an AgentConfig."""

    restart: str = "always"  # always | on-failure | never
    success_exit_codes: frozenset[int] = frozenset({0})
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    backoff_reset_after: float = 60.0
    start_limit: int = 5
    start_limit_window: float = 60.0
    #: READY=1 must arrive within this many seconds, else the start failed.
    start_timeout: float = 30.0
    #: A worker alive this long counts as ready without READY=1 (None: must notify).
    ready_after: float | None = None
    #: No WATCHDOG=1 for this long (once ready) -> killed as hung.
    watchdog: float | None = None
    #: +/- fraction of random jitter applied to each backoff delay.
    jitter: float = 0.2
    #: Dying within this many seconds of READY is an unstable restart (start limit).
    min_uptime: float = 10.0

    @classmethod
    def from_agent(cls, agent: AgentLike) -> RestartPolicy:
        ready_after: float | None = None
        if agent.kind == "command":
            ready_after = agent.start_seconds
        return cls(
            restart=agent.restart,
            success_exit_codes=frozenset(agent.success_exit_codes),
            backoff_initial=agent.backoff_initial,
            backoff_max=agent.backoff_max,
            backoff_reset_after=agent.backoff_reset_after,
            start_limit=agent.start_limit,
            start_limit_window=agent.start_limit_window,
            start_timeout=agent.start_timeout,
            ready_after=ready_after,
            watchdog=agent.watchdog,
            min_uptime=agent.min_uptime,
        )


@dataclass(frozen=True)
class ExitInfo:
    """How a worker ended: exactly one of ``code`` / ``signal`` is set."""

    code: int | None = None
    signal: int | None = None
    #: Set when we ended it (watchdog, memory limit, stop, restart ...).
    cause: str | None = None
    #: Human text: "exit 1", "signal SIGSEGV", "watchdog" ...
    reason: str = ""
    #: It died on a message (crash suspect run alone, stuck handler): never toward fatal.
    message_failure: bool = False


@dataclass(frozen=True)
class Action:
    """What the daemon should do for a worker now."""

    kind: str  # "spawn" | "kill" | "ready"
    cause: str | None = None


@dataclass
class WorkerLifecycle:
    """State of one worker slot across its incarnations."""

    policy: RestartPolicy
    rng: random.Random = field(default_factory=random.Random)
    state: WorkerState = WorkerState.STOPPED
    restarts: int = 0  # automatic restarts performed
    failures_in_row: int = 0
    boot_failures_in_row: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    last_heartbeat: float | None = None
    restart_at: float | None = None  # when in BACKOFF
    last_exit: ExitInfo | None = None
    fatal_reason: str | None = None
    stop_cause: str | None = None  # why we asked it to stop
    _restart_times: deque[float] = field(default_factory=deque)

    # -- events -------------------------------------------------------------
    def request_start(self, now: float) -> None:
        """Start wanted (initial start, start_agent): clears fatal and counters."""
        self.fatal_reason = None
        self.failures_in_row = 0
        self.boot_failures_in_row = 0
        self._restart_times.clear()
        if self.state in (WorkerState.STOPPED, WorkerState.FATAL, WorkerState.EXITED):
            self.state = WorkerState.BACKOFF
            self.restart_at = now

    def on_spawned(self, now: float) -> None:
        self.state = WorkerState.STARTING
        self.started_at = now
        self.ready_at = None
        self.last_heartbeat = None
        self.restart_at = None
        self.stop_cause = None

    def on_ready(self, now: float) -> bool:
        """READY=1 (or start_seconds elapsed); True when this changed the state."""
        if self.state != WorkerState.STARTING:
            return False
        self.state = WorkerState.READY
        self.ready_at = now  # the watchdog counts from here until the first WATCHDOG=1
        self.boot_failures_in_row = 0
        return True

    def on_heartbeat(self, now: float) -> None:
        self.last_heartbeat = now

    def on_stop_requested(self, cause: str) -> bool:
        """We are about to signal the worker; False when it is not running."""
        if self.state not in (WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING):
            if self.state == WorkerState.BACKOFF and cause == CAUSE_STOP:
                self.state = WorkerState.STOPPED
                self.restart_at = None
            return False
        # A stop wins over an earlier restart/memory cause; keep the first failure cause.
        if self.stop_cause is None or cause == CAUSE_STOP:
            self.stop_cause = cause
        self.state = WorkerState.STOPPING
        return True

    def on_exit(self, now: float, exit_info: ExitInfo) -> WorkerState:
        """The process is gone; decide restart / backoff / fatal / stopped."""
        cause = exit_info.cause or self.stop_cause
        if cause != exit_info.cause:
            exit_info = ExitInfo(
                exit_info.code, exit_info.signal, cause, exit_info.reason, exit_info.message_failure
            )
        self.last_exit = exit_info
        was_ready = self.ready_at is not None
        uptime = now - self.started_at if self.started_at is not None else 0.0
        self.state = WorkerState.EXITED
        if cause == CAUSE_STOP or self.stop_cause == CAUSE_STOP:  # a stop request always wins
            self.state = WorkerState.STOPPED
            return self.state

        failed = self._is_failure(exit_info) or not was_ready
        stable = was_ready and (
            self.ready_at is not None and now - self.ready_at >= self.policy.min_uptime
        )
        unstable = not stable and not exit_info.message_failure
        if was_ready and uptime >= self.policy.backoff_reset_after:
            self.failures_in_row = 0
        if failed and not exit_info.message_failure:
            self.failures_in_row += 1
        elif not failed:
            self.failures_in_row = 0
        if not was_ready and cause != CAUSE_RESTART:
            self.boot_failures_in_row += 1

        if not self._should_restart(exit_info, failed):
            self.state = WorkerState.STOPPED
            return self.state

        # Start limit: more than start_limit unstable restarts within the window -> fatal.
        window_start = now - self.policy.start_limit_window
        while self._restart_times and self._restart_times[0] < window_start:
            self._restart_times.popleft()
        if cause != CAUSE_RESTART and unstable:
            if len(self._restart_times) >= self.policy.start_limit:
                return self._fatal(
                    f"{len(self._restart_times) + 1} starts within "
                    f"{self.policy.start_limit_window:g}s"
                )
            if self.boot_failures_in_row > self.policy.start_limit:
                return self._fatal(f"{self.boot_failures_in_row} failed starts in a row")
            self._restart_times.append(now)
        self.restarts += 1
        self.state = WorkerState.BACKOFF
        self.restart_at = now + self.backoff_delay()
        return self.state

    def _fatal(self, why: str) -> WorkerState:
        self.state = WorkerState.FATAL
        self.fatal_reason = why
        self.restart_at = None
        return self.state

    def _is_failure(self, exit_info: ExitInfo) -> bool:
        if exit_info.cause in FAILURE_CAUSES:
            return True
        if exit_info.cause == CAUSE_RESTART:
            return False
        if exit_info.signal is not None:
            return True
        return exit_info.code not in self.policy.success_exit_codes

    def _should_restart(self, exit_info: ExitInfo, failed: bool) -> bool:
        if exit_info.cause in (CAUSE_RESTART, CAUSE_MEMORY):
            return True
        if self.policy.restart == "always":
            return True
        if self.policy.restart == "on-failure":
            return failed
        return False

    def backoff_delay(self) -> float:
        """0 for the first failure (or a clean restart), then exponential with jitter."""
        if self.failures_in_row <= 1:
            return 0.0
        base = self.policy.backoff_initial * (2 ** (self.failures_in_row - 2))
        base = min(base, self.policy.backoff_max)
        spread = base * self.policy.jitter
        return float(
            max(0.0, min(self.policy.backoff_max, base + self.rng.uniform(-spread, spread)))
        )

    # -- timers -------------------------------------------------------------
    def tick(self, now: float) -> Action | None:
        """What is due now: spawn after backoff, ready by start_seconds, or a kill."""
        if self.state == WorkerState.BACKOFF:
            if self.restart_at is not None and now >= self.restart_at:
                return Action("spawn")
            return None
        if self.state == WorkerState.STARTING and self.started_at is not None:
            if (
                self.policy.ready_after is not None
                and now >= self.started_at + self.policy.ready_after
            ):
                return Action("ready")
            if (
                self.policy.ready_after is None
                and now >= self.started_at + self.policy.start_timeout
            ):
                return Action("kill", CAUSE_START_TIMEOUT)
            return None
        if self.state == WorkerState.READY and self.policy.watchdog is not None:
            last = self.last_heartbeat if self.last_heartbeat is not None else self.ready_at
            if last is not None and now >= last + self.policy.watchdog:
                return Action("kill", CAUSE_WATCHDOG)
        return None

    def next_deadline(self) -> float | None:
        """Earliest time :meth:`tick` may return an action (None: only on events)."""
        if self.state == WorkerState.BACKOFF:
            return self.restart_at
        if self.state == WorkerState.STARTING and self.started_at is not None:
            if self.policy.ready_after is not None:
                return self.started_at + self.policy.ready_after
            return self.started_at + self.policy.start_timeout
        if self.state == WorkerState.READY and self.policy.watchdog is not None:
            last = self.last_heartbeat if self.last_heartbeat is not None else self.ready_at
            return None if last is None else last + self.policy.watchdog
        return None

    @property
    def running(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING)

    def describe(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "restarts": self.restarts,
            "failures_in_row": self.failures_in_row,
            "fatal_reason": self.fatal_reason,
        }
