"""What a worker's exit means: its reason, the lifecycle's verdict, counters and log lines.

Pure bookkeeping on the worker table's records (no I/O besides log events),
called by :class:`~supervisor.runtime.table.WorkerTable` only, so the exit
path is: reap → ``table.exited`` (:func:`record_exit`) → reclaim → reconcile.
Reasons are told truthfully: our own kill causes (watchdog, memory limit,
start timeout, handler stuck) win over the raw status; a SIGKILL we did not
send is an OOM kill only on evidence (the cgroup's ``oom_kill`` counter rose),
otherwise ``killed by SIGKILL (not sent by this supervisor)``; and an exit
before READY that we did not ask for is a
failed start (kept as the agent's ``last_start_error`` for ``/status``).
"""

from __future__ import annotations

import signal

from core_bus.log import get_logger
from supervisor.runtime.lifecycle import (
    CAUSE_MEMORY,
    CAUSE_RESTART,
    CAUSE_START_TIMEOUT,
    CAUSE_STOP,
    CAUSE_STUCK,
    CAUSE_WATCHDOG,
    ExitInfo,
    WorkerState,
)
from supervisor.runtime.process import ExitStatus
from supervisor.runtime.records import AgentRuntime, Worker
from supervisor.runtime.resources import OomEvidence

log = get_logger("supervisor.fleet.daemon")

#: Kill causes of ours that name an exit better than the signal we sent.
OWN_KILL_CAUSES = (CAUSE_WATCHDOG, CAUSE_MEMORY, CAUSE_START_TIMEOUT, CAUSE_STUCK)

#: The supervisor's cgroup OOM counter (baseline read when the daemon imports this).
OOM = OomEvidence()
OOM_KILL = "signal SIGKILL (OOM kill: cgroup oom_kill rose)"


def exit_reason(
    worker: Worker, status: ExitStatus, we_sent_kill: bool, oom: OomEvidence = OOM
) -> str:
    """``watchdog`` / ``memory limit`` / ``start timeout``, else ``exit N`` / ``signal …``."""
    if worker.kill_cause in OWN_KILL_CAUSES:
        return worker.kill_cause
    if status.signal == signal.SIGKILL and not we_sent_kill:
        return OOM_KILL if oom.rose() else "killed by SIGKILL (not sent by this supervisor)"
    return status.describe(we_sent_kill=we_sent_kill)


def record_exit(
    runtime: AgentRuntime,
    worker: Worker,
    now: float,
    status: ExitStatus,
    reason: str,
    pid: int | None,
) -> WorkerState:
    """Feed the exit to the lifecycle, count it, fold the worker's message totals, log."""
    was_ready = worker.lifecycle.ready_at is not None
    # Running a crash suspect alone, or replaced for a stuck handler: the message failed.
    message_failure = worker.isolating is not None or worker.kill_cause == CAUSE_STUCK
    state = worker.lifecycle.on_exit(
        now,
        ExitInfo(status.code, status.signal, worker.kill_cause, reason, message_failure),
    )
    if message_failure:
        runtime.message_crashes += 1
        log.warning(
            "worker died on a message",
            agent=runtime.name,
            worker=worker.key,
            entry=worker.isolating,
            reason=reason,
        )
    worker.isolating = None
    runtime.exits_by_reason[reason] += 1
    if worker.stats is not None:
        stats = worker.stats
        stats.in_flight = 0
        runtime.totals.merge(stats)
        worker.stats = None
    fields = {
        "agent": runtime.name,
        "worker": worker.key,
        "pid": pid,
        "reason": reason,
        "next": str(state),
    }
    expected = worker.lifecycle.stop_cause in (CAUSE_STOP, CAUSE_RESTART) or (
        status.code == 0 and worker.kill_cause is None
    )
    if not was_ready and not expected:
        runtime.last_start_error = f"{worker.key} failed to start: {reason}"
        if worker.capture.last_error:  # the exception line, not only "exit 3"
            runtime.last_start_error += f": {worker.capture.last_error}"
            fields["error"] = worker.capture.last_error
        log.warning("worker failed to start", **fields)
    elif expected:
        log.info("worker exited", **fields)
    else:
        log.warning("worker exited", **fields)
    if state == WorkerState.FATAL:
        log.error(
            "worker fatal", agent=runtime.name, worker=worker.key, why=worker.lifecycle.fatal_reason
        )
    return state


def record_spawn_failure(
    runtime: AgentRuntime, worker: Worker, now: float, exc: Exception
) -> WorkerState:
    """A worker that could not even be spawned: exit 127, a failed start."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if not isinstance(exc, OSError | ValueError):
        detail = f"{type(exc).__name__}: {detail}"
    reason = f"spawn failed: {detail}"
    log.error("worker spawn failed", agent=runtime.name, worker=worker.key, error=reason)
    state = worker.lifecycle.on_exit(now, ExitInfo(code=127, reason=reason))
    runtime.exits_by_reason[reason] += 1
    runtime.last_start_error = f"{worker.key}: {reason}"
    worker.consumer = None
    return state
