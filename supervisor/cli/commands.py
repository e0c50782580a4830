"""Argument parsing for ``ag1-fleet``; each command lives in its own module.

Command modules expose ``main(args: argparse.Namespace) -> int`` and are
imported lazily so ``ag1-fleet check`` does not pay for aiohttp or psutil.
"""

from __future__ import annotations

import argparse
import importlib
import os

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


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("AG1_CONFIG", DEFAULT_CONFIG),
        help="path to fleet.toml (default: $AG1_CONFIG or ./fleet.toml)",
    )


def _control_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument(
        "--url", help="control API base URL (default: from the config's [http] listen)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ag1-fleet",
        description="Run and control a fleet of AG1 bus agents.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the fleet in the foreground",
        description="Run the fleet in the foreground (under systemd in production).",
        epilog="example: ag1-fleet run -c fleet.example.toml",
    )
    _config_arg(run)

    check = sub.add_parser(
        "check",
        help="validate fleet.toml and print the resolved plan",
        epilog="example: ag1-fleet check -c fleet.toml  (exit code 2 when invalid)",
    )
    _config_arg(check)
    check.add_argument("--json", action="store_true", help="print the plan as JSON")

    status = sub.add_parser(
        "status", help="show agents and workers", epilog="example: ag1-fleet status --json"
    )
    _control_args(status)

    restart = sub.add_parser(
        "restart",
        help="restart an agent's workers",
        epilog="example: ag1-fleet restart echo --rolling",
    )
    _control_args(restart)
    restart.add_argument("agent")
    restart.add_argument("--rolling", action="store_true", help="one worker at a time, no downtime")

    scale = sub.add_parser(
        "scale", help="change an agent's replicas", epilog="example: ag1-fleet scale echo 3"
    )
    _control_args(scale)
    scale.add_argument("agent")
    scale.add_argument("replicas", type=int)

    for name, text in (("stop", "stop an agent"), ("start", "start an agent (clears fatal)")):
        cmd = sub.add_parser(name, help=text, epilog=f"example: ag1-fleet {name} echo")
        _control_args(cmd)
        cmd.add_argument("agent")

    reload = sub.add_parser(
        "reload", help="re-read fleet.toml and apply it", epilog="example: ag1-fleet reload"
    )
    _control_args(reload)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    result: int = module.main(args)
    return result
