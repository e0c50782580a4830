"""What a worker process is started with: its argv and environment.

Every worker gets the supervisor's environment minus what belongs to our own
service manager (``NOTIFY_SOCKET``, ``WATCHDOG_*``, ``LISTEN_*``) and minus the
supervisor's own secrets (``AG1_HTTP__TOKEN``, ``AG1_CONTROL_TOKEN``,
``AG1_REDIS__PASSWORD``, ``REDIS_PASSWORD``, ``AG1_REDIS__URL``,
``AG1_REDIS__SENTINEL_PASSWORD``, ``REDIS_SENTINEL_PASSWORD``: a worker reads
``REDIS_URL``; an agent whose ``env`` names one of them gets its own value), plus:

- identity: ``AG1_AGENT``, ``AG1_WORKER`` (``agent/slot``), ``AG1_GROUP``,
  ``AG1_CONSUMER`` (unique per incarnation), ``AG1_STREAMS`` (comma-separated,
  shards expanded; glob patterns as written, to be followed with
  :mod:`core_bus.following`), ``AG1_DISCOVERY_INTERVAL`` (seconds between SCANs,
  only with patterns), ``AG1_WORKING_DIR``;
- the bus: ``REDIS_URL`` (with the password: never log it), ``BUS_NAMESPACE``,
  ``REDIS_MODE``, ``REDIS_DURABILITY``, ``REDIS_REPLICAS_TO_WAIT``,
  ``REDIS_WAIT_TIMEOUT`` (ms) and in sentinel mode ``REDIS_SENTINELS``,
  ``REDIS_MASTER_NAME`` and, when the supervisor has one, ``REDIS_SENTINEL_PASSWORD``
  (the inherited sentinel password variables are dropped and set from the config);
- supervision: ``NOTIFY_SOCKET`` (ours), ``AG1_SUPERVISOR_PID``,
  ``AG1_WATCHDOG_USEC`` when the agent has a watchdog, ``PYTHONUNBUFFERED=1``;
- handler agents (run by :mod:`supervisor.worker`): ``AG1_HANDLER``,
  ``AG1_CONCURRENCY``, ``AG1_COUNT``, ``AG1_MAX_DELIVERIES``, ``AG1_DLQ``,
  ``AG1_HANDLER_TIMEOUT``, ``AG1_HANDLER_TIMEOUT_GRACE``, ``AG1_CLAIM_IDLE``, ``AG1_DLQ_MAXLEN``,
  ``AG1_DRAIN_TIMEOUT``, ``AG1_OWNERSHIP_FENCE``, ``AG1_SHARD_LEASE_TTL`` and
  ``AG1_MEMBER_LEASE`` (from ``[supervisor] lease_ttl`` and name), and for
  ordered agents ``AG1_ORDERED``, ``AG1_SHARDS``, ``AG1_BASE_STREAMS``.

The agent's own ``env`` table is applied last and wins.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config.models import AgentConfig

#: Inherited variables that belong to *our* service manager, never to children.
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")

#: The supervisor's own secrets: a worker (any program an agent runs) never inherits them.
SUPERVISOR_SECRETS = (
    "AG1_HTTP__TOKEN",
    "AG1_CONTROL_TOKEN",
    "AG1_REDIS__PASSWORD",
    "REDIS_PASSWORD",
    "AG1_REDIS__URL",
    "AG1_REDIS__SENTINEL_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
)


def child_environment(base: dict[str, str]) -> dict[str, str]:
    """The supervisor's environment without its service manager's variables and secrets."""
    return {
        k: v
        for k, v in base.items()
        if k not in SYSTEMD_ENV and k.upper() not in SUPERVISOR_SECRETS
    }


@dataclass(frozen=True)
class FleetContext:
    """The fleet-wide part of every worker's environment."""

    base_env: dict[str, str]  # already passed through child_environment()
    redis_url: str
    namespace: str
    notify_socket: str
    config_dir: Any  # default working directory: the directory holding fleet.toml
    lease_ttl: float = 0.0  # the supervisor's membership lease (0: none)
    member_lease_key: str = ""  # and its key
    #: REDIS_MODE, REDIS_SENTINELS, ... (supervisor.redis.target.worker_redis_env)
    redis_env: dict[str, str] = field(default_factory=dict)


def working_dir(agent: AgentConfig, fleet: FleetContext) -> Path:
    return agent.working_dir or fleet.config_dir


def worker_environment(
    agent: AgentConfig, fleet: FleetContext, worker_key: str, consumer: str
) -> dict[str, str]:
    """The environment of one worker incarnation (see the module docstring)."""
    env = dict(fleet.base_env)
    env.update(
        {
            "AG1_AGENT": agent.name,
            "AG1_WORKER": worker_key,
            "AG1_GROUP": agent.group,
            "AG1_CONSUMER": consumer,
            "AG1_STREAMS": ",".join(agent.read_streams),
            "REDIS_URL": fleet.redis_url,
            **fleet.redis_env,
            "BUS_NAMESPACE": fleet.namespace,
            "NOTIFY_SOCKET": fleet.notify_socket,
            "PYTHONUNBUFFERED": "1",
            "AG1_SUPERVISOR_PID": str(os.getpid()),
            "AG1_WORKING_DIR": str(working_dir(agent, fleet)),
        }
    )
    if agent.keys.cluster:  # REDIS_MODE=cluster: a cluster client and tagged keys
        env["REDIS_MODE"] = "cluster"
    if agent.watchdog:
        env["AG1_WATCHDOG_USEC"] = str(int(agent.watchdog * 1e6))
    if agent.stream_patterns:
        env["AG1_DISCOVERY_INTERVAL"] = f"{agent.discovery_interval:g}"
    if agent.handler is not None:
        env.update(
            {
                "AG1_HANDLER": agent.handler,
                "AG1_CONCURRENCY": str(agent.concurrency),
                "AG1_COUNT": str(agent.count),
                "AG1_MAX_DELIVERIES": str(agent.max_deliveries),
                "AG1_DLQ": agent.dlq_stream,
                "AG1_HANDLER_TIMEOUT": f"{float(agent.handler_timeout):g}",
                "AG1_HANDLER_TIMEOUT_GRACE": f"{float(agent.handler_timeout_grace):g}",
                "AG1_CLAIM_IDLE": f"{float(agent.claim_idle):g}",
                "AG1_DLQ_MAXLEN": str(agent.dead_letter_maxlen),
                # Leave a margin under stop_timeout so acks land before SIGKILL.
                "AG1_DRAIN_TIMEOUT": f"{max(agent.stop_timeout * 0.8, 0.1):g}",
            }
        )
        if fleet.lease_ttl:
            # Workers re-check what they hold when they could not renew for 2/3 of the
            # membership lease (a paused host: its entries may be reclaimed elsewhere),
            # and ordered shard leases last no longer than the membership lease.
            env["AG1_OWNERSHIP_FENCE"] = f"{fleet.lease_ttl * 2 / 3:g}"
            env["AG1_SHARD_LEASE_TTL"] = f"{min(10.0, fleet.lease_ttl):g}"
            if fleet.member_lease_key:
                env["AG1_MEMBER_LEASE"] = fleet.member_lease_key
        if agent.ordered:
            env.update(
                {
                    "AG1_ORDERED": "1",
                    "AG1_SHARDS": str(agent.shards),
                    "AG1_BASE_STREAMS": ",".join(agent.streams),
                }
            )
    env.update(agent.env)
    return env


def worker_argv(agent: AgentConfig) -> list[str]:
    """Handler agents run the built-in worker; command agents their own program."""
    if agent.command is None:  # a handler agent
        return [sys.executable, "-m", "supervisor.worker"]
    return list(agent.command)
