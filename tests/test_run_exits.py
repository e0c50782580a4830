"""Exit bookkeeping (supervisor.runtime.exits): truthful reasons, failed starts, message totals."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

from core_bus.consume.stats import SubscriptionStats
from supervisor.runtime.exits import OOM_KILL, exit_reason, record_exit, record_spawn_failure
from supervisor.runtime.lifecycle import CAUSE_WATCHDOG, RestartPolicy, WorkerLifecycle, WorkerState
from supervisor.runtime.process import ExitStatus
from supervisor.runtime.resources import OomEvidence
from supervisor.runtime.table import AgentRuntime, Worker


def _worker() -> tuple[AgentRuntime, Worker]:
    runtime = AgentRuntime(SimpleNamespace(name="a"), desired=1)
    lifecycle = WorkerLifecycle(RestartPolicy(backoff_initial=0.1))
    lifecycle.request_start(0.0)
    lifecycle.on_spawned(0.0)
    worker = Worker("a", 0, lifecycle)
    runtime.workers[0] = worker
    return runtime, worker


def test_exit_reason_prefers_our_kill_cause_and_says_oom_only_on_evidence(tmp_path: Path) -> None:
    """Our watchdog kill reads 'watchdog'; a SIGKILL we did not send is an OOM kill only
    when the cgroup's memory.events oom_kill counter rose, else "not sent by this supervisor"."""
    _, worker = _worker()
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    oom = OomEvidence(events)
    killed = ExitStatus(None, signal.SIGKILL)
    foreign = "killed by SIGKILL (not sent by this supervisor)"
    assert exit_reason(worker, killed, we_sent_kill=False, oom=oom) == foreign
    events.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    assert exit_reason(worker, killed, we_sent_kill=False, oom=oom) == OOM_KILL
    assert exit_reason(worker, killed, we_sent_kill=False, oom=oom) == foreign  # no new rise
    unreadable = OomEvidence(tmp_path / "missing")
    assert exit_reason(worker, killed, we_sent_kill=False, oom=unreadable) == foreign
    assert exit_reason(worker, killed, we_sent_kill=True) == "signal SIGKILL"
    worker.kill_cause = CAUSE_WATCHDOG
    assert exit_reason(worker, killed, we_sent_kill=True) == CAUSE_WATCHDOG


def test_exit_before_ready_is_a_failed_start_and_totals_are_kept() -> None:
    """Dying before READY sets the agent's last_start_error; the incarnation's message
    counters fold into the agent totals (in-flight zeroed)."""
    runtime, worker = _worker()
    worker.stats = SubscriptionStats(processed=7, in_flight=2)
    state = record_exit(runtime, worker, 1.0, ExitStatus(3, None), "exit 3", 123)
    assert state == WorkerState.BACKOFF
    assert runtime.last_start_error == "a/0 failed to start: exit 3"
    assert runtime.exits_by_reason["exit 3"] == 1
    assert runtime.totals.processed == 7 and runtime.totals.in_flight == 0
    assert worker.stats is None


def test_spawn_failure_counts_as_exit_127() -> None:
    """A program that cannot be spawned is a failed start with the OS error as reason."""
    runtime, worker = _worker()
    worker.consumer = "c"
    record_spawn_failure(runtime, worker, 0.5, FileNotFoundError(2, "No such file or directory"))
    assert runtime.last_start_error == "a/0: spawn failed: No such file or directory"
    assert worker.lifecycle.last_exit is not None and worker.lifecycle.last_exit.code == 127
    assert worker.consumer is None


def test_agent_with_every_worker_stalled_is_degraded_with_the_reason() -> None:
    """All ready workers report stalled handler slots: the agent is degraded (not
    running), its last_error says why and /readyz lists it; one healthy worker suffices."""
    from supervisor.fleet.snapshot import agent_error
    from supervisor.runtime.readiness import agent_state

    runtime, worker = _worker()
    runtime.enabled = True
    worker.lifecycle.on_ready(0.5)
    worker.stats = SubscriptionStats(in_flight=16, stalled=1, stuck=2)
    assert agent_state(runtime) == "degraded"
    assert "stalled on all 1 ready workers" in (agent_error(runtime) or "")
    assert "2 stuck" in (agent_error(runtime) or "")
    worker.stats = SubscriptionStats(in_flight=3)
    assert agent_state(runtime) == "running"


def test_readyz_names_a_degraded_agent_whose_replicas_are_all_up() -> None:
    from supervisor.fleet.snapshot import AgentSnapshot, FleetSnapshot
    from supervisor.http.server import readiness

    agent = AgentSnapshot(
        name="a",
        group="a",
        streams=[],
        desired_replicas=1,
        ready_replicas=1,
        state="degraded",
        last_error="handlers stalled on all 1 ready workers",
    )
    snap = FleetSnapshot(
        version="x",
        supervisor_name="t",
        started_at=0.0,
        uptime_seconds=0.0,
        config_path="",
        config_hash="",
        redis_url="",
        redis_up=True,
        agents=[agent],
        ready=True,
    )
    assert readiness(snap) == ["agent a: degraded: handlers stalled on all 1 ready workers"]
