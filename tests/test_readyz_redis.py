"""Honest health: /readyz follows Redis within a second, with Redis's own error as the reason.

A real daemon with a real HTTP server against its own redis-server, which the
test SIGKILLs and starts again on the same port.
"""

from __future__ import annotations

import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from tests.fleet_harness import agent, agent_toml, cmd, run_toml
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

SLEEP = "import time; time.sleep(120)"


async def _readyz(session: aiohttp.ClientSession, base: str) -> tuple[int, list[str]]:
    async with session.get(base + "/readyz") as resp:
        return resp.status, (await resp.json())["reasons"]


async def _time_until(
    session: aiohttp.ClientSession, base: str, status: int, limit: float = 10.0
) -> tuple[float, list[str]]:
    """Seconds until /readyz answers ``status`` (polled every 20 ms), and its reasons."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        got, reasons = await _readyz(session, base)
        if got == status:
            return time.monotonic() - start, reasons
        await anyio.sleep(0.02)
    raise AssertionError(f"/readyz never answered {status} within {limit}s")


def _daemon(tmp_path: Path, url: str, python_exe: str, *agents: str) -> FleetDaemon:
    toml = run_toml(
        *(agents or (agent_toml("sleepy", cmd(python_exe, SLEEP)),)),
        name="readyz",
        url=url,
        listen="127.0.0.1:0",
        stop_timeout="5s",
    )
    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(toml))
    return FleetDaemon(load_config(path))


async def test_readyz_turns_503_within_a_second_of_losing_redis_and_back(
    tmp_path: Path, redis_server_factory: Any, python_exe: str
) -> None:
    server = redis_server_factory(appendonly=False)
    daemon = _daemon(tmp_path, server.url, python_exe)
    with anyio.fail_after(80):
        async with anyio.create_task_group() as tg, aiohttp.ClientSession() as session:
            await tg.start(daemon.run)
            try:
                assert daemon.http_address is not None
                base = "http://{}:{}".format(*daemon.http_address)
                await eventually(lambda: agent(daemon, "sleepy").ready_replicas == 1, timeout=30)
                await _time_until(session, base, 200, limit=30)

                await anyio.to_thread.run_sync(server.kill)  # never block the daemon's loop
                lost, reasons = await _time_until(session, base, 503)
                assert lost <= 1.0, f"/readyz still 200 {lost:.2f}s after Redis died"
                assert reasons[0].startswith("redis: ") and "Error" in reasons[0], reasons
                assert "unreachable" not in reasons[0]  # Redis's own error, not a guess

                restarted = await anyio.to_thread.run_sync(
                    partial(redis_server_factory, port=server.port, appendonly=False)
                )
                assert await anyio.to_thread.run_sync(restarted.ping)
                back, _ = await _time_until(session, base, 200)
                assert back <= 1.0, f"/readyz still 503 {back:.2f}s after Redis returned"
            finally:
                daemon.request_stop()


async def test_readyz_names_redis_while_it_is_down_at_start(
    tmp_path: Path, redis_server_factory: Any, python_exe: str
) -> None:
    """A handler agent cannot get ready without Redis: the reason names Redis, not 'starting'."""
    server = redis_server_factory(appendonly=False)
    server.kill()  # a port nothing listens on any more
    (tmp_path / "h.py").write_text("async def handle(env, redis):\n    return None\n")
    daemon = _daemon(tmp_path, server.url, python_exe, agent_toml("reader", handler="h:handle"))
    with anyio.fail_after(80):
        async with anyio.create_task_group() as tg, aiohttp.ClientSession() as session:
            await tg.start(daemon.run)
            try:
                assert daemon.http_address is not None
                base = "http://{}:{}".format(*daemon.http_address)

                async def names_redis() -> bool:
                    status, reasons = await _readyz(session, base)
                    return status == 503 and any(
                        r.startswith("redis: ") and "Error" in r for r in reasons
                    )

                await eventually(names_redis, timeout=10, message="/readyz names Redis")
                assert not daemon.control.snapshot().ready  # still starting, and says why
            finally:
                daemon.request_stop()
