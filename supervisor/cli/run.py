"""``ag1-fleet run``: load fleet.toml and run the daemon in the foreground.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 2 for an invalid
config (one line per problem, no traceback), 1 when the daemon cannot run
(Redis binary missing, HTTP address refused ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import anyio

from core_bus.log import configure_logging, get_logger

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _load(path: Path) -> Any:
    from supervisor.config.load import load_config

    return load_config(path)


def main(args: argparse.Namespace) -> int:
    from supervisor.cli.check import problems_with_hint
    from supervisor.config.load import ConfigError

    path = Path(args.config)
    try:
        config = _load(path)
    except ConfigError as exc:
        for problem in problems_with_hint(exc, path):
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    fmt = getattr(config.supervisor, "log_format", "auto")
    configure_logging(json=None if fmt == "auto" else fmt == "json")
    log = get_logger("supervisor.run")
    for line in config.warnings:
        log.warning("config warning", problem=line)

    from supervisor.fleet.daemon import FleetDaemon
    from supervisor.runtime.sdnotify import Notifier

    systemd = Notifier(os.environ.get("NOTIFY_SOCKET") or None)
    daemon = FleetDaemon(config, config_loader=_load, systemd=systemd)
    try:
        anyio.run(daemon.run)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        leaves = list(_leaves(exc))
        if all(isinstance(e, _expected_failures()) for e in leaves):
            # Known refusals (address in use, no token, no redis-server): one line each.
            for leaf in leaves:
                log.error("supervisor cannot run", error=str(leaf))
        else:
            log.error("supervisor failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        return EXIT_RUNTIME
    finally:
        systemd.close()
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _expected_failures() -> tuple[type[BaseException], ...]:
    from supervisor.fleet.snapshot import ControlError
    from supervisor.redis.server import RedisServerError

    return (ControlError, RedisServerError, OSError)
