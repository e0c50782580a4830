"""``ag1-fleet status|restart|scale|stop|start|reload``: talk to a running supervisor.

Exit codes: 0 success, 1 the request failed (supervisor unreachable, unknown
agent, unauthorized, rejected), 2 usage. Failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from supervisor.cli.client import (
    TOKEN_ENV,
    ControlClient,
    ControlClientError,
    Reply,
    resolve_target,
    token_from_env,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(args: argparse.Namespace) -> int:
    """Run one control command; never raises for operational failures."""
    if args.command == "scale" and args.replicas < 0:
        print("ag1-fleet scale: replicas must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        base_url, timeout = resolve_target(
            getattr(args, "config", None), getattr(args, "url", None)
        )
        client = ControlClient(base_url, token=token_from_env(), timeout=timeout)
        if getattr(args, "fleet", False):  # across hosts: supervisor.cli.fleet
            from supervisor.cli import fleet

            if args.command == "status":
                return fleet.status(client, args.json)
            return fleet.restart(client, args)
        if args.command == "status":
            return _status(client, args.json)
        return _control(client, args)
    except ControlClientError as exc:
        print(f"ag1-fleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


# ----------------------------------------------------------------------------- control


def _control(client: ControlClient, args: argparse.Namespace) -> int:
    if args.command == "reload" and getattr(args, "config_named", False):
        _same_config_or_refuse(client, args.config)
    path, body = _request_for(args)
    reply = client.post(path, body)
    if reply.status in (200, 202):
        if args.json:
            print(json.dumps(reply.body, indent=2, sort_keys=True))
        else:
            print(_success_line(args, reply))
        return EXIT_OK
    if args.json and reply.body:
        print(json.dumps(reply.body, indent=2, sort_keys=True))
    print(f"ag1-fleet {args.command}: {_failure_text(args, reply, client)}", file=sys.stderr)
    problems = reply.body.get("errors") or []
    if reply.status == 409 and isinstance(problems, list) and len(problems) > 1:
        for problem in problems:  # the first line said "rejected"; list each problem
            print(f"  {problem}", file=sys.stderr)
    return EXIT_FAILED


def _same_config_or_refuse(client: ControlClient, config: str) -> None:
    """``reload -c FILE``: the supervisor re-reads its own file, so FILE must be it.

    :raises ControlClientError: the supervisor runs another file (nothing is reloaded).
    """
    reply = client.get("/status")
    if reply.status != 200:
        return  # the reload request itself reports what is wrong
    running = str(reply.body.get("config_file") or "")
    if not running:
        return  # an older supervisor: it does not say which file it runs
    given = Path(config).resolve()
    if given != Path(running).resolve():
        raise ControlClientError(
            f"refusing: the supervisor at {client.base_url} runs {running}, not {given}; "
            "reload re-reads the supervisor's own file, so edit that one (or restart the "
            f"supervisor with -c {config} to run this one). Nothing was reloaded."
        )


def _request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.command == "reload":
        return "/v1/reload", {}
    agent = args.agent
    if args.command == "restart":
        return f"/v1/agents/{agent}/restart", {"rolling": bool(args.rolling)}
    if args.command == "scale":
        return f"/v1/agents/{agent}/scale", {"replicas": args.replicas}
    return f"/v1/agents/{agent}/{args.command}", {}


def _success_line(args: argparse.Namespace, reply: Reply) -> str:
    accepted = reply.status == 202
    suffix = " (still running; watch `ag1-fleet status`)" if accepted else ""
    if args.command == "restart":
        kind = "rolling restart" if args.rolling else "restart"
        verb = "started" if accepted else "done"
        return f"{kind} of {args.agent} {verb}{suffix}"
    if args.command == "scale":
        return f"scaled {args.agent} to {args.replicas} replicas{suffix}"
    if args.command in ("stop", "start"):
        done = {"stop": "stopped", "start": "started"}[args.command]
        return f"{done} {args.agent}{suffix}"
    if accepted:
        return f"reload accepted{suffix}"
    return "reloaded: " + reload_summary(reply.body)


def reload_summary(body: dict[str, Any]) -> str:
    """One line for a ``/v1/reload`` reply body: what changed, and what needs a restart."""
    parts = [
        f"{key} {', '.join(body[key])}"
        for key in ("added", "removed", "changed", "scaled")
        if body.get(key)
    ]
    unchanged = len(body.get("unchanged", []))
    if unchanged:
        parts.append(f"{unchanged} unchanged")
    summary = "; ".join(parts) if parts else "no changes"
    restart = body.get("restart_required") or []
    if restart:  # [supervisor]/[redis]/[http] edits wait for a restart: say so
        summary += f"; restart needed for: {', '.join(restart)}"
    return summary


def _failure_text(args: argparse.Namespace, reply: Reply, client: ControlClient) -> str:
    error = str(reply.body.get("error", "")).strip()
    if reply.status == 401:
        if client.token is None:
            return f"unauthorized: the supervisor requires a token; set {TOKEN_ENV}"
        return f"unauthorized: {TOKEN_ENV} does not match the supervisor's token"
    if reply.status == 404 and getattr(args, "agent", None):
        return f"unknown agent {args.agent!r}"
    if reply.status == 409 and args.command == "reload":
        return f"reload rejected, the old plan keeps running: {error or 'invalid config'}"
    if reply.status in (400, 409) and error:
        return error
    return f"supervisor answered {reply.status}: {error or 'no details'}"


# ----------------------------------------------------------------------------- status


def _status(client: ControlClient, as_json: bool) -> int:
    reply = client.get("/status")
    if reply.status != 200:
        error = reply.body.get("error", "no details")
        raise ControlClientError(f"supervisor answered {reply.status}: {error}")
    if as_json:
        print(json.dumps(reply.body, indent=2, sort_keys=True))
    else:
        print(format_status(reply.body))
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    """A readable, fixed-width view of ``/status``."""
    lines = [_header(status)]
    if status.get("last_reload_error"):
        lines.append(f"last reload rejected: {status['last_reload_error']}")
    agents = status.get("agents", [])
    lines += [
        "",
        *_table(
            [
                "AGENT",
                "STATE",
                "READY",
                "RESTARTS",
                "PROCESSED",
                "FAILED",
                "DEAD-LETTERED SINCE START",
                "DLQ",
            ],
            [
                [
                    a["name"],
                    f"{a['state']} (rolling)" if a.get("rolling") else a["state"],
                    f"{a['ready_replicas']}/{a['desired_replicas']}",
                    a.get("restarts_total", 0),
                    a.get("messages", {}).get("processed", 0),
                    a.get("messages", {}).get("failed", 0),
                    a.get("messages", {}).get("dead_lettered", 0),
                    _or_q(a.get("dlq_length")),
                ]
                for a in agents
            ],
        ),
        "(DLQ: entries in the agent's dead-letter stream now; ag1-bus dlq list AGENT)",
        *[f"{a['name']}: last error: {a['last_error']}" for a in agents if a.get("last_error")],
        *[
            f"{a['name']}: streams {p!r} matched {n}"
            for a in agents
            for p, n in sorted((a.get("patterns") or {}).items())
        ],
    ]
    workers = [w for a in agents for w in a.get("workers", [])]
    if workers:
        lines += [
            "",
            *_table(
                [
                    "WORKER",
                    "STATE",
                    "PID",
                    "RESTARTS",
                    "UPTIME",
                    "RSS",
                    "CPU",
                    "IN-FLIGHT",
                    "LAST EXIT",
                    "STATUS",
                ],
                [
                    [
                        w["worker_id"],
                        w["state"],
                        _or_dash(w.get("pid")),
                        w.get("restarts", 0),
                        _duration(w.get("uptime_seconds")),
                        _bytes(w.get("rss_bytes")),
                        _percent(w.get("cpu_percent")),
                        w.get("in_flight", 0),
                        _or_dash(w.get("last_exit")),
                        _worker_says(w),
                    ]
                    for w in workers
                ],
            ),
        ]
    groups = status.get("groups", [])
    if groups:
        lines += [
            "",
            *_table(
                ["STREAM", "GROUP", "PENDING", "LAG", "CONSUMERS"],
                [
                    [
                        g["stream"],
                        g["group"],
                        _or_q(g.get("pending")),
                        _lag(g),
                        _or_q(g.get("consumers")),
                    ]
                    for g in groups
                ],
            ),
            *[
                f"* {g['stream']} {g['group']}: {g['lag_note']}"
                for g in groups
                if g.get("lag_note")
            ],
        ]
    orphans = status.get("orphan_groups", [])
    if orphans:
        lines += [
            "",
            f"orphan groups (no fleet reads them; remove one with "
            f"ag1-bus groups {orphans[0]['stream']} --destroy {orphans[0]['group']}):",
            *_table(
                ["STREAM", "GROUP", "PENDING", "CONSUMERS"],
                [
                    [g["stream"], g["group"], _or_q(g.get("pending")), _or_q(g.get("consumers"))]
                    for g in orphans
                ],
            ),
        ]
    return "\n".join(lines)


STATUS_CHARS = 60


def _worker_says(worker: dict[str, Any]) -> str:
    """The worker's own STATUS= text, else its last error line; cut to fit a row."""
    text = worker.get("status_text") or (
        f"stderr: {worker['last_error']}" if worker.get("last_error") else "-"
    )
    return text if len(text) <= STATUS_CHARS else text[: STATUS_CHARS - 1] + "…"


def _lag(group: dict[str, Any]) -> str:
    """The lag; ``*`` marks one counted by the supervisor because Redis gave none."""
    lag = group.get("lag")
    if lag is None:
        return "unknown"
    return f"{lag}*" if group.get("lag_note") else str(lag)


def _header(status: dict[str, Any]) -> str:
    redis = "up" if status.get("redis_up") else f"DOWN ({status.get('redis_error') or '?'})"
    plan = "ready" if status.get("ready") else "starting"
    return (
        f"supervisor {status.get('supervisor_name', '?')}  version {status.get('version', '?')}  "
        f"up {_duration(status.get('uptime_seconds'))}  plan {plan}  redis {redis}\n"
        f"config {status.get('config_path', '?')} ({str(status.get('config_hash', ''))[:12]})"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _or_q(value: Any) -> str:
    return "?" if value is None else str(value)


def _fmt(render: Callable[[float], str]) -> Callable[[Any], str]:
    def wrapped(value: Any) -> str:
        return "-" if value is None else render(float(value))

    return wrapped


def _render_duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _render_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"  # pragma: no cover


_duration = _fmt(_render_duration)
_bytes = _fmt(_render_bytes)
_percent = _fmt(lambda v: f"{v:.1f}%")

__all__ = ["format_status", "main", "reload_summary"]
