"""Readiness read from the worker table: an agent's state, ``after`` gates, the plan being up.

Pure functions of :class:`~supervisor.runtime.records.AgentRuntime` records.
"""

from __future__ import annotations

from supervisor.runtime.lifecycle import WorkerState
from supervisor.runtime.records import AgentRuntime


def agent_state(runtime: AgentRuntime) -> str:
    """running | starting | degraded | stopped | fatal, as /status and /readyz show it."""
    if not runtime.enabled:
        return "stopped"
    if any(w.lifecycle.state == WorkerState.FATAL for w in runtime.workers.values()):
        return "fatal"
    ready = len(runtime.ready_workers())
    if ready >= runtime.desired:
        if runtime.desired and stalled_reason(runtime):
            return "degraded"
        return "running" if runtime.desired else "stopped"
    if not runtime.gate_open:
        return "starting"
    if any(w.lifecycle.restarts for w in runtime.workers.values()):
        return "degraded"
    return "starting"


def stalled_reason(runtime: AgentRuntime) -> str | None:
    """Why an agent whose workers are all up still makes no progress, if it does not.

    Every ready worker reports (X_AG1_STATS) that all its handler slots have been
    busy for longer than ``claim_idle``, or that handlers ignore their cancellation.
    """
    ready = runtime.ready_workers()
    if not ready:
        return None
    reports = [w.stats for w in ready]
    if any(s is None or not (s.stalled or s.stuck) for s in reports):
        return None
    stuck = sum(s.stuck for s in reports if s is not None)
    return (
        f"handlers stalled on all {len(ready)} ready workers "
        f"(every slot busy longer than claim_idle; {stuck} stuck past handler_timeout)"
    )


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
