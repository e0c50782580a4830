"""Wall time of one idle CLI call (no supervisor answering), and what it imports.

    .venv/bin/python bench/cli_latency.py [--runs 15] [--source DIR]

``--source DIR`` runs another checkout's code with this interpreter (PYTHONPATH),
e.g. a ``git worktree`` of the commit before a change, for a before/after figure.
Prints one ``name: median ms (min ms)`` line per command, then the imports
of ``ag1-fleet status`` that take over 10 ms cumulative. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A port nobody listens on: the call fails fast with "connection refused", which is
# the idle cost of the CLI itself (the supervisor's answer is ~1 ms on loopback).
CLOSED = "http://127.0.0.1:9"
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "ag1-fleet status": ["-m", "supervisor.cli.main", "status", "--url", CLOSED],
    "ag1-fleet status -c fleet.toml": ["-m", "supervisor.cli.main", "status", "-c", "fleet.toml"],
    "ag1-fleet --help": ["-m", "supervisor.cli.main", "--help"],
    "ag1-bus --help": ["-m", "core_bus.tools.cli", "--help"],
}


def _time(argv: list[str], env: dict[str, str], cwd: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, *argv], env=env, cwd=cwd, capture_output=True, check=False
        )
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--source", type=Path, default=ROOT)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(args.source.resolve()))
    with tempfile.TemporaryDirectory() as cwd:
        (Path(cwd) / "fleet.toml").write_text((ROOT / "fleet.example.toml").read_text())
        for name, argv in COMMANDS.items():
            ms = _time(argv, env, cwd, args.runs)
            print(f"{name}: {statistics.median(ms):.0f} ms median ({min(ms):.0f} ms min)")
        trace = subprocess.run(
            [sys.executable, "-X", "importtime", *COMMANDS["ag1-fleet status -c fleet.toml"]],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    print("imports of `ag1-fleet status -c fleet.toml` over 10 ms cumulative (top level):")
    for line in trace.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2]
            if int(parts[1]) > 10_000 and not name.startswith("  "):
                print(f"  {name.strip()}: {int(parts[1]) / 1000:.0f} ms")


if __name__ == "__main__":
    main()
