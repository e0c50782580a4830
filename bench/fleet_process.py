"""Start and stop ``ag1-fleet run`` for the benchmarks (one copy, shared by them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def start_fleet(work: Path, toml: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Write ``work/fleet.toml`` and run the supervisor in its own session, JSON logs
    to ``work/run.log``. Returns the process and the log path."""
    config = work / "fleet.toml"
    config.write_text(textwrap.dedent(toml))
    log_path = work / "run.log"
    env = dict(os.environ, AG1_LOG_FORMAT="json")
    env.pop("NOTIFY_SOCKET", None)
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli.main", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(work),
            start_new_session=True,
        )
    return fleet, log_path


def http_port(log_path: Path, timeout: float = 60.0) -> int:
    """The control API port, from the supervisor's ``http_listening`` log event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "http_listening":
                return int(event["port"])
        time.sleep(0.05)
    raise RuntimeError(f"the supervisor did not start its HTTP server (see {log_path})")


def stop_fleet(fleet: subprocess.Popen[bytes]) -> None:
    """SIGTERM the supervisor's group, SIGKILL it after 30 s."""
    if fleet.poll() is not None:
        return
    os.killpg(fleet.pid, signal.SIGTERM)
    try:
        fleet.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(fleet.pid, signal.SIGKILL)
        fleet.wait(10)
