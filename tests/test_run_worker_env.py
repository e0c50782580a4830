"""The environment and argv a worker is started with (supervisor.runtime.worker_env)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from supervisor.config.load import load_config
from supervisor.runtime.worker_env import (
    FleetContext,
    child_environment,
    worker_argv,
    worker_environment,
)


def test_worker_environment_names_its_identity_bus_and_supervisor(tmp_path: Path) -> None:
    """A handler worker gets its identity, the bus (REDIS_URL, BUS_NAMESPACE), our notify
    socket and pid, ordered-shard settings; our own systemd variables never leak, and
    the agent's env table wins."""
    (tmp_path / "a.py").write_text("async def handle(env, redis):\n    pass\n")
    path = tmp_path / "fleet.toml"
    path.write_text(
        textwrap.dedent(
            """
            [redis]
            url = "redis://127.0.0.1:1/0"
            namespace = "NS"
            [[agents]]
            name = "ledger"
            handler = "a:handle"
            streams = ["ledger:in"]
            shards = 2
            ordered = true
            watchdog = "2s"
            env = { BUS_NAMESPACE = "mine" }
            """
        )
    )
    config = load_config(path)
    (agent,) = config.agents
    base = child_environment({"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1"})
    fleet = FleetContext(base, "redis://h/0", "NS", "/tmp/n.sock", config.config_dir)
    env = worker_environment(agent, fleet, "ledger/0", "sup:ledger:0:1")
    assert env["PATH"] == "/bin" and "WATCHDOG_USEC" not in env
    assert env["NOTIFY_SOCKET"] == "/tmp/n.sock"
    assert env["AG1_SUPERVISOR_PID"] == str(os.getpid())
    assert env["AG1_WORKER"] == "ledger/0" and env["AG1_CONSUMER"] == "sup:ledger:0:1"
    assert env["REDIS_URL"] == "redis://h/0"
    assert env["BUS_NAMESPACE"] == "mine"  # the agent's env table is applied last
    assert env["AG1_ORDERED"] == "1" and env["AG1_SHARDS"] == "2"
    assert env["AG1_BASE_STREAMS"] == "ledger:in"
    assert len(env["AG1_STREAMS"].split(",")) == 2
    assert env["AG1_WATCHDOG_USEC"] == "2000000"
    assert env["AG1_WORKING_DIR"] == str(tmp_path)
    assert worker_argv(agent) == [sys.executable, "-m", "supervisor.worker"]
