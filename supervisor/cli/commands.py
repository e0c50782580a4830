"""Argument parsing for ``ag1-fleet``; each command lives in its own module.

Command modules expose ``main(args: argparse.Namespace) -> int`` and are
imported lazily so ``ag1-fleet check`` does not pay for aiohttp or psutil.
"""

from __future__ import annotations

import argparse
import importlib
import os
import textwrap
from typing import Any

DEFAULT_CONFIG = "fleet.toml"

# command name -> module implementing it
COMMANDS: dict[str, str] = {
    "run": "supervisor.cli.run",
    "check": "supervisor.cli.check",
    "status": "supervisor.cli.control",
    "restart": "supervisor.cli.control",
    "scale": "supervisor.cli.control",
    "stop": "supervisor.cli.control",
    "start": "supervisor.cli.control",
    "reload": "supervisor.cli.control",
}


EXAMPLES = """\
examples:
  ag1-fleet check -c fleet.example.toml      validate a config, print the resolved plan
  ag1-fleet run -c fleet.example.toml        run the example fleet (Ctrl-C stops it)
  ag1-fleet status                           agents, workers, groups of the running fleet
  ag1-fleet restart echo --rolling           replace echo's workers one by one
  ag1-fleet restart echo --rolling --fleet   the same on every host, host by host
  ag1-fleet status --fleet                   every supervisor on this Redis, per host
  ag1-fleet scale echo 3                     run 3 workers of echo
  ag1-fleet reload                           re-read the running fleet's config file

The control commands (status, restart, scale, stop, start, reload) find the running
supervisor through the config's [http] listen (-c), $AG1_HTTP__LISTEN or --url;
AG1_CONTROL_TOKEN holds the token when the control API asks for one.
run 'ag1-fleet COMMAND --help' for each command."""


def _command(
    sub: Any, name: str, summary: str, description: str, examples: list[str]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 88),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help=f"path to the fleet config (default: $AG1_CONFIG, else ./{DEFAULT_CONFIG}; "
        "a fresh clone has only fleet.example.toml)",
    )


def _control_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument(
        "--url",
        metavar="URL",
        help="control API base URL, e.g. http://127.0.0.1:8765 (default: the config's "
        "[http] listen, else $AG1_HTTP__LISTEN, else 127.0.0.1:8765)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the supervisor's JSON reply as is"
    )


def _agent_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("agent", metavar="AGENT", help="agent name, as in [[agents]] name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ag1-fleet",
        description=textwrap.fill(
            "Run and control a fleet of AG1 bus agents: a supervisor that starts the agents "
            "of a fleet.toml, restarts them, hands a dead worker's messages to its siblings "
            "and serves probes, metrics and a control API.",
            88,
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(
        sub,
        "run",
        "run the fleet in the foreground",
        "Run the fleet in the foreground until SIGTERM/Ctrl-C (under systemd in "
        "production). Exit 2 for an invalid config, 1 when it cannot run (port in use, "
        "no redis-server).",
        ["ag1-fleet run -c fleet.example.toml", "AG1_HTTP__LISTEN=127.0.0.1:8766 ag1-fleet run"],
    )
    _config_arg(run)

    check = _command(
        sub,
        "check",
        "validate fleet.toml and print the resolved plan",
        "Validate the config (every problem on its own line, exit 2) and print the plan "
        "the supervisor would run: start order, workers, groups, streams, limits.",
        ["ag1-fleet check -c fleet.example.toml", "ag1-fleet check --json | jq .start_order"],
    )
    _config_arg(check)
    check.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = _command(
        sub,
        "status",
        "show agents, workers and consumer groups of the running fleet",
        "Ask the running supervisor for its state: each agent (state, ready workers, "
        "restarts, messages, dead letters), each worker, each group's pending and lag, "
        "and orphan groups no fleet reads.",
        [
            "ag1-fleet status",
            "ag1-fleet status --json",
            "ag1-fleet status --url http://h:8765",
            "ag1-fleet status --fleet",
        ],
    )
    _control_args(status)
    status.add_argument(
        "--fleet",
        action="store_true",
        help="every supervisor of the fleet (all hosts on this Redis), read from Redis",
    )

    restart = _command(
        sub,
        "restart",
        "restart an agent's workers",
        "Restart every worker of AGENT: all at once (each drains first), or with "
        "--rolling one batch at a time, replacements ready before the old ones stop.",
        [
            "ag1-fleet restart echo --rolling",
            "ag1-fleet restart echo",
            "ag1-fleet restart echo --rolling --fleet",
        ],
    )
    _control_args(restart)
    _agent_arg(restart)
    restart.add_argument(
        "--rolling",
        action="store_true",
        help="start replacements first and wait for them to be ready (no downtime)",
    )
    restart.add_argument(
        "--fleet",
        action="store_true",
        help="on every host that runs AGENT, one host after the other (each READY again "
        "before the next starts); any supervisor of the fleet coordinates it",
    )
    restart.add_argument(
        "--host-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --fleet: how long one host may take (default 120)",
    )
    restart.add_argument(
        "--wait",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="with --fleet: how long to follow the roll before leaving it running (default 900)",
    )

    scale = _command(
        sub,
        "scale",
        "change an agent's replicas",
        "Run REPLICAS workers of AGENT (0 stops them all); until the next reload or restart.",
        ["ag1-fleet scale echo 3", "ag1-fleet scale echo 0"],
    )
    _control_args(scale)
    _agent_arg(scale)
    scale.add_argument("replicas", type=int, metavar="REPLICAS", help="number of workers (>= 0)")

    for name, summary, description in (
        (
            "stop",
            "stop an agent",
            "Stop AGENT's workers (each drains what it holds) and keep them stopped "
            "until 'ag1-fleet start AGENT'.",
        ),
        (
            "start",
            "start an agent (clears fatal)",
            "Start a stopped AGENT, or try a fatal one again (clears its start limit).",
        ),
    ):
        cmd = _command(sub, name, summary, description, [f"ag1-fleet {name} echo"])
        _control_args(cmd)
        _agent_arg(cmd)

    reload = _command(
        sub,
        "reload",
        "re-read the running fleet's config file and apply it",
        "Make the supervisor re-read the config file it runs (as SIGHUP does) and apply "
        "the difference: unchanged agents keep running, changed ones are rolled. With -c, "
        "the file must be the one the supervisor runs (it is refused otherwise).",
        ["ag1-fleet reload", "ag1-fleet reload -c /etc/ag1-fleet/fleet.toml"],
    )
    _control_args(reload)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # -c or $AG1_CONFIG named the file (reload compares it with the supervisor's own)
    args.config_named = args.config is not None or bool(os.environ.get("AG1_CONFIG"))
    if args.config is None:
        args.config = os.environ.get("AG1_CONFIG") or DEFAULT_CONFIG
    module = importlib.import_module(COMMANDS[args.command])
    result: int = module.main(args)
    return result
