"""``ag1-fleet check``: validate fleet.toml and print the resolved plan.

Exit 0 with the plan on stdout when valid; exit 2 with one line per problem
on stderr when not (never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from supervisor.config.load import ConfigError, load_config
from supervisor.config.models import AgentConfig, FleetConfig
from supervisor.config.plan import Plan, build_plan
from supervisor.config.units import format_duration, format_size

EXIT_INVALID = 2


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in problems_with_hint(exc, Path(args.config)):
            print(line, file=sys.stderr)
        return EXIT_INVALID
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    plan = build_plan(config)
    if getattr(args, "json", False):
        print(json.dumps(plan_to_dict(config, plan), indent=2))
    else:
        print(render_plan(config, plan))
    return 0


def problems_with_hint(exc: ConfigError, path: Path) -> list[str]:
    """The loader's problems; a missing file also says what to pass instead (a fresh
    clone has only fleet.example.toml)."""
    if exc.problems != [f"{path}: file not found"]:
        return list(exc.problems)
    example = path.with_name("fleet.example.toml")
    if path.name != example.name and example.is_file():
        shown = example.name if path.parent == Path() else str(example)
        hint = f"try: -c {shown}, or copy it to {path.name}"
    else:
        hint = "pass the file with -c PATH or set AG1_CONFIG"
    return [f"{path}: file not found ({hint})"]


def plan_to_dict(config: FleetConfig, plan: Plan) -> dict[str, Any]:
    """The resolved plan as JSON-ready data (secrets and env values redacted)."""
    return {
        "config": str(config.path),
        "hash": config.hash,
        "supervisor": config.supervisor.model_dump(mode="json"),
        "redis": {
            "url": config.redis.redacted_url(),
            "embedded": config.redis.embedded,
            "namespace": config.redis.namespace,
            "embedded_port": config.redis.embedded_port,
            "password_set": config.redis.password is not None,
            "mode": config.redis.mode,
            "sentinels": config.redis.sentinels,
            "master_name": config.redis.master_name,
            "sentinel_password_set": config.redis.sentinel_password is not None,
            "durability": config.redis.durability,
            "replicas_to_wait": config.redis.replicas_to_wait,
            "wait_timeout": config.redis.wait_timeout,
        },
        "http": {
            **config.http.model_dump(mode="json", exclude={"token"}),
            "token_set": config.http.token is not None,
        },
        "start_order": plan.start_order(),
        "workers": plan.worker_count,
        "agents": [
            {
                **agent.config.model_dump(mode="json"),
                # env may hold secrets set via AG1_AGENTS__<NAME>__ENV__<VAR>: names only
                "env": dict.fromkeys(agent.config.env, "***"),
                "kind": agent.kind,
                "workers": agent.worker_names,
                "read_streams": agent.read_streams,
                "dlq_stream": agent.config.dlq_stream,
                "fingerprint": agent.fingerprint,
            }
            for agent in plan.agents.values()
        ],
    }


def render_plan(config: FleetConfig, plan: Plan) -> str:
    """Human-readable plan: fleet header, start order, one block per agent."""
    sup, redis, http = config.supervisor, config.redis, config.http
    agents = len(plan.agents)
    lines = [
        f"{config.path}: OK: {agents} agent{'s' if agents != 1 else ''}, "
        f"{plan.worker_count} worker{'s' if plan.worker_count != 1 else ''} "
        f"(sha256 {config.hash[:12]})",
        f"supervisor  {sup.name}  state_dir={sup.state_dir}  stop_timeout="
        f"{format_duration(sup.stop_timeout)}  sweep={format_duration(sup.sweep_interval)}",
        "redis       "
        + redis.describe()
        + f"  namespace={redis.namespace}"
        + ("  password=(from env)" if redis.password is not None else "")
        + ("  sentinel_password=(from env)" if redis.sentinel_password is not None else "")
        + (
            f"  durability=replicated (WAIT {redis.replicas_to_wait} "
            f"{format_duration(redis.wait_timeout)})"
            if redis.durability == "replicated"
            else ""
        ),
        "http        " + (f"http://{http.listen}" if http.enabled else "disabled"),
        "start order " + "  ->  ".join(", ".join(layer) for layer in plan.start_order()),
    ]
    for agent in plan.agents.values():
        lines.append("")
        lines.extend(_render_agent(agent.config, agent.worker_names))
    return "\n".join(lines)


def _render_agent(agent: AgentConfig, workers: list[str]) -> list[str]:
    what = (
        f"handler {agent.handler}" if agent.handler else "command " + " ".join(agent.command or [])
    )
    if not workers:
        worker_text = "none (replicas = 0)"
    elif len(workers) <= 4:
        worker_text = ", ".join(workers)
    else:
        worker_text = f"{workers[0]} .. {workers[-1]} ({len(workers)})"
    shards = (
        f"  shards={agent.shards}{' ordered' if agent.ordered else ''}" if agent.shards > 1 else ""
    )
    lines = [
        f"agent {agent.name}  ({what})",
        f"  workers   {worker_text}",
        f"  group     {agent.group}{shards}",
        f"  streams   {', '.join(agent.read_streams)}",
        f"  dlq       {agent.dlq_stream}  (after {agent.max_deliveries} deliveries)",
        f"  restart   {agent.restart}, backoff {format_duration(agent.backoff_initial)}.."
        f"{format_duration(agent.backoff_max)}, at most {agent.start_limit} starts in "
        f"{format_duration(agent.start_limit_window)}",
        f"  consume   concurrency={agent.concurrency} count={agent.count} "
        f"claim_idle={format_duration(agent.claim_idle)}",
    ]
    limits = [f"stop_timeout={format_duration(agent.stop_timeout)}"]
    if agent.memory_limit is not None:
        limits.append(f"memory_limit={format_size(agent.memory_limit)}")
    if agent.watchdog is not None:
        limits.append(f"watchdog={format_duration(agent.watchdog)}")
    lines.append("  limits    " + " ".join(limits))
    if agent.after:
        lines.append(f"  after     {', '.join(agent.after)}")
    lines.append(f"  cwd       {agent.working_dir}")
    if agent.env:
        lines.append(f"  env       {', '.join(sorted(agent.env))}")
    return lines
