"""``ag1-fleet status --fleet`` and ``restart AGENT --fleet``: the fleet across hosts.

Both ask one supervisor (any host), which reads the fleet from Redis
(``GET /v1/fleet``) or coordinates the roll. A fleet roll usually outlasts
the server's request timeout (202): the command then follows ``/v1/fleet``
until that roll has ended, and prints each host's outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from supervisor.cli.client import ControlClient, ControlClientError

EXIT_OK, EXIT_FAILED = 0, 1
#: How often the CLI re-reads /v1/fleet while a roll it started runs.
FOLLOW_INTERVAL = 0.5


def fleet_view(client: ControlClient) -> dict[str, Any]:
    reply = client.get("/v1/fleet")
    if reply.status != 200:
        error = reply.body.get("error", "no details")
        raise ControlClientError(f"supervisor answered {reply.status}: {error}", reply.status)
    return reply.body


def status(client: ControlClient, as_json: bool) -> int:
    view = fleet_view(client)
    print(json.dumps(view, indent=2, sort_keys=True) if as_json else format_fleet(view))
    return EXIT_OK


def restart(client: ControlClient, args: argparse.Namespace) -> int:
    """POST the fleet restart, then follow it to its end; one line per host.

    Success: the roll's lines on stdout, exit 0. Failure (whether the server
    answered 409 at once or the roll failed after a 202): the lines and the
    error on stderr, exit 1.
    """
    before = (fleet_view(client).get("last_roll") or {}).get("id")
    body: dict[str, Any] = {"rolling": bool(args.rolling), "fleet": True}
    if args.host_timeout is not None:
        body["timeout"] = args.host_timeout
    reply = client.post(f"/v1/agents/{args.agent}/restart", body)
    error = ""
    if reply.status == 202:
        roll = _follow(client, before, args.agent, args.wait)
    elif reply.status == 200:
        roll = reply.body.get("roll") or {}
    else:
        error = str(reply.body.get("error", "")).strip() or f"supervisor answered {reply.status}"
        last = (fleet_view(client).get("last_roll") or {}) if reply.status == 409 else {}
        roll = last if last.get("id") != before else {}
    ok = not error and roll.get("state") == "done"
    error = error or str(roll.get("error") or "") or "the roll did not finish"
    if args.json:
        print(json.dumps(roll or reply.body, indent=2, sort_keys=True))
    elif roll.get("hosts"):
        print("\n".join(roll_lines(roll)), file=sys.stdout if ok else sys.stderr)
    if ok:
        return EXIT_OK
    print(f"ag1-fleet restart: {error}", file=sys.stderr)
    return EXIT_FAILED


def _follow(client: ControlClient, before: str | None, agent: str, wait: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    roll: dict[str, Any] = {}
    while time.monotonic() < deadline:
        roll = fleet_view(client).get("last_roll") or {}
        if roll.get("id") != before and roll.get("agent") == agent and roll["state"] != "running":
            return roll
        time.sleep(FOLLOW_INTERVAL)
    raise ControlClientError(
        f"the fleet restart of {agent} still runs after {wait:g}s; watch `ag1-fleet status --fleet`"
    )


def roll_lines(roll: dict[str, Any]) -> list[str]:
    kind = "rolling restart" if roll.get("rolling") else "restart"
    lines = [f"fleet {kind} of {roll.get('agent')}: {roll.get('state')}"]
    for host in roll.get("hosts") or []:
        detail = f"ready {host['ready']}" if host.get("ready") else ""
        if host.get("error"):
            detail = f"{detail}; {host['error']}" if detail else host["error"]
        lines.append(f"  {host['name']}: {host['state']}" + (f" ({detail})" if detail else ""))
    return lines


# ----------------------------------------------------------------------------- formatting


def format_fleet(view: dict[str, Any]) -> str:
    """Each live host with its agents, then the dead and departed, then recent commands."""
    now = int(view.get("redis_time_ms") or 0)
    members = view.get("members") or []
    lines = [f"fleet: {len(members)} live supervisor(s) (asked {view.get('asked', '?')})"]
    for m in members:
        age = m.get("heartbeat_age_ms")
        lines += [
            "",
            f"{m['name']}  host {m.get('host') or '?'}  pid {m.get('pid') or '?'}  "
            f"incarnation {m.get('incarnation') or '?'}  heartbeat "
            f"{'?' if age is None else f'{age / 1000:.1f}s'} ago  http {m.get('http') or '-'}",
            *[
                f"  {line}"
                for line in _table(
                    ["AGENT", "WORKERS", "READY", "ROLLING"],
                    [
                        [
                            name,
                            a.get("workers", 0),
                            a.get("ready", 0),
                            "yes" if a.get("rolling") else "-",
                        ]
                        for name, a in sorted((m.get("agents") or {}).items())
                    ],
                )
            ],
        ]
    for m in view.get("unreclaimed") or []:
        lines += [
            "",
            f"{m['name']}: lease gone, not yet reclaimed",
            *[f"  {n}" for n in m.get("notes") or []],
        ]
    departed = view.get("departed") or []
    if departed:
        lines += [
            "",
            "departed:",
            *[
                f"  {line}"
                for line in _table(
                    [
                        "NAME",
                        "INCARNATION",
                        "REASON",
                        "AGO",
                        "RECLAIMED BY",
                        "RECLAIMED",
                        "PENDING LEFT",
                    ],
                    [
                        [
                            d["name"],
                            d.get("incarnation") or "-",
                            d.get("reason") or "-",
                            _ago(d.get("at_ms"), now),
                            d.get("reclaimed_by") or "-",
                            _counts(d.get("reclaimed")),
                            _counts(d.get("pending_left")),
                        ]
                        for d in departed
                    ],
                )
            ],
            *[f"  {d['name']}: {n}" for d in departed for n in d.get("notes") or []],
        ]
    roll = view.get("last_roll")
    if roll:
        lines += ["", *roll_lines(roll)]
        if roll.get("error"):
            lines.append(f"  error: {roll['error']}")
    return "\n".join(lines)


def _yes(flag: Any) -> str:
    return "yes" if flag else "-"


def _ago(at_ms: Any, now_ms: int) -> str:
    if not at_ms or not now_ms:
        return "-"
    seconds = max(0, now_ms - int(at_ms)) // 1000
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _counts(counts: Any) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
