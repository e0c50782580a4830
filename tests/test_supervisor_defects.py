"""Defects of wave 1's supervisor, each pinned by a test that failed on the old code.

An in-process FleetDaemon on the session's private redis-server, real worker
processes, real signals.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from tests.fleet_harness import agent, agent_toml, cmd, fleet_toml, running, worker
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SLEEPER = "import time; time.sleep(600)"


async def consumers(redis: Any, stream: str, group: str) -> dict[str, int]:
    rows = await redis.xinfo_consumers(stream, group)
    return {_text(r["name"]): int(r["pending"]) for r in rows}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_command_agent_is_never_swept_to_nor_signalled(
    tmp_path: Path, python_exe: str, redis: Any, redis_url: str
) -> None:
    """A command agent that does not read the bus (a plain sleeper) while its group
    holds an idle entry: nothing is claimed to its consumer name and it is never sent
    SIGUSR1 (wave 1 killed such an agent 4 times in 8 s)."""
    stream, group = "AG1:agent:sleeper:inbox", "sleeper"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    await redis.xadd(stream, {"data": "{}"})
    await redis.xreadgroup(group, "ghost", {stream: ">"}, count=1)
    toml = fleet_toml(
        agent_toml(
            "sleeper",
            cmd(python_exe, SLEEPER),
            start_seconds="0.1s",
            claim_idle="0.2s",
            sweep_interval="0.2s",
        ),
        url=redis_url,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "sleeper").state == "ready", 15)
        pid = worker(daemon, "sleeper").pid
        await anyio.sleep(2.0)  # the thing under test: ten sweep periods pass, nothing happens
        assert worker(daemon, "sleeper").pid == pid
        assert agent(daemon, "sleeper").restarts_total == 0
        assert await consumers(redis, stream, group) == {"ghost": 1}


async def test_startup_cleanup_leaves_library_consumers_on_the_same_host_alone(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """A supervisor named after the host starts next to a library user whose default
    consumer name (``host:pid:random``) holds in-flight entries of the same group: the
    start-up cleanup neither deletes that consumer nor claims its entries (wave 1 matched
    every name starting with ``host:``)."""
    (tmp_path / "lib_agent.py").write_text("async def handle(env):\n    pass\n")
    stream, group = "AG1:agent:shared:inbox", "shared"
    library = f"{socket.gethostname()}:{os.getpid()}:a1b2c3"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    for _ in range(3):
        await redis.xadd(stream, {"data": "{}"})
    await redis.xreadgroup(group, library, {stream: ">"}, count=3)
    toml = fleet_toml(
        agent_toml("shared", handler="lib_agent:handle", working_dir=str(tmp_path)),
        name=socket.gethostname(),
        url=redis_url,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "shared").state == "ready", 20)
        runtime = daemon.table.agents["shared"]
        await eventually(lambda: runtime.stale_cleaned, 5)
        await anyio.sleep(1.0)  # the thing under test: the cleanup ran and touched nothing
        assert (await consumers(redis, stream, group)).get(library) == 3


async def test_a_reload_that_raises_keeps_the_fleet_running(
    tmp_path: Path, python_exe: str, redis_url: str
) -> None:
    """SIGHUP with a reload that raises while it is applied: the error is logged and
    kept as last_reload_error, the daemon and its workers keep running (wave 1 let the
    exception end the daemon and every healthy agent)."""
    path = tmp_path / "fleet.toml"
    ready_then_sleep = (
        "from supervisor.runtime.sdnotify import sd_notify; import time; "
        "sd_notify('READY=1'); time.sleep(600)"
    )
    path.write_text(
        textwrap.dedent(
            fleet_toml(agent_toml("steady", cmd(python_exe, ready_then_sleep)), url=redis_url)
        )
    )
    config = load_config(path)

    def broken_loader(_path: Path) -> Any:
        return object()  # not a FleetConfig: applying it raises AttributeError

    daemon = FleetDaemon(config, config_loader=broken_loader)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                await eventually(lambda: agent(daemon, "steady").ready_replicas == 1, 15)
                pid = worker(daemon, "steady").pid
                os.kill(os.getpid(), signal.SIGHUP)
                await eventually(lambda: daemon.control.last_reload_error, 10)
                assert "AttributeError" in str(daemon.control.last_reload_error)
                assert worker(daemon, "steady").pid == pid
                assert agent(daemon, "steady").state == "running"
            finally:
                daemon.request_stop()
