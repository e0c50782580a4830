"""The desired fleet derived from a config, its start order, and the diff of two plans.

The daemon reconciles towards a :class:`Plan`. On reload, :meth:`Plan.diff`
says which agents to start (added), stop (removed), replace (changed: their
fingerprint differs) or merely scale (only ``replicas`` differs).

The fingerprint covers everything a running worker was started with: the
agent's whole config except ``replicas``, plus the fleet settings a worker
sees (Redis URL and password, namespace, supervisor name). It is a SHA-256, so
it may be logged although the password went into it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from supervisor.config.models import AgentConfig, FleetConfig


@dataclass(frozen=True)
class AgentPlan:
    """What should run for one agent."""

    name: str
    group: str
    read_streams: list[str]
    replicas: int
    kind: Literal["handler", "command"]
    after: list[str]
    config: AgentConfig
    fingerprint: str

    @property
    def worker_names(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(self.replicas)]


@dataclass(frozen=True)
class PlanDiff:
    """Agent names by what a reload must do with them (each list in config order)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    scaled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when applying the new plan would change nothing."""
        return not (self.added or self.removed or self.changed or self.scaled)


@dataclass(frozen=True)
class Plan:
    """Every agent of a config, keyed by name, in config order."""

    agents: dict[str, AgentPlan]

    def start_order(self) -> list[list[str]]:
        """Layers of agent names: each layer only waits for agents in earlier layers.

        Names inside a layer keep config order. ``after`` entries naming agents
        absent from the plan are ignored (the loader already rejected them).
        """
        pending = {
            name: {d for d in plan.after if d in self.agents and d != name}
            for name, plan in self.agents.items()
        }
        layers: list[list[str]] = []
        done: set[str] = set()
        while pending:
            layer = [name for name, deps in pending.items() if deps <= done]
            if not layer:  # a cycle slipped through: start the rest together
                layer = list(pending)
            layers.append(layer)
            done.update(layer)
            for name in layer:
                del pending[name]
        return layers

    def stop_order(self) -> list[list[str]]:
        """The start order reversed: dependents stop before what they depend on."""
        return [list(layer) for layer in reversed(self.start_order())]

    @property
    def worker_count(self) -> int:
        return sum(plan.replicas for plan in self.agents.values())

    def diff(self, new: Plan) -> PlanDiff:
        """What changes from ``self`` (running) to ``new`` (just loaded)."""
        added = [name for name in new.agents if name not in self.agents]
        removed = [name for name in self.agents if name not in new.agents]
        changed: list[str] = []
        scaled: list[str] = []
        unchanged: list[str] = []
        for name, plan in new.agents.items():
            old = self.agents.get(name)
            if old is None:
                continue
            if old.fingerprint != plan.fingerprint:
                changed.append(name)
            elif old.replicas != plan.replicas:
                scaled.append(name)
            else:
                unchanged.append(name)
        return PlanDiff(added, removed, changed, scaled, unchanged)


def fingerprint(agent: AgentConfig, fleet_context: dict[str, Any] | None = None) -> str:
    """SHA-256 over the agent's config minus ``replicas`` plus ``fleet_context``."""
    payload = {
        "agent": agent.model_dump(mode="json", exclude={"replicas"}),
        "namespace": agent.namespace,
        "fleet": fleet_context or {},
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fleet_context(config: FleetConfig) -> dict[str, Any]:
    redis = config.redis
    password = redis.password.get_secret_value() if redis.password is not None else None
    return {
        "redis_url": redis.url,
        "redis_password": password,
        "embedded_port": redis.embedded_port,
        "supervisor": config.supervisor.name,
    }


def build_plan(config: FleetConfig) -> Plan:
    """The plan for a loaded config (agents keep their order in the file)."""
    context = _fleet_context(config)
    agents = {
        agent.name: AgentPlan(
            name=agent.name,
            group=agent.group,
            read_streams=agent.read_streams,
            replicas=agent.replicas,
            kind=agent.kind,
            after=list(agent.after),
            config=agent,
            fingerprint=fingerprint(agent, context),
        )
        for agent in config.agents
    }
    return Plan(agents=agents)
