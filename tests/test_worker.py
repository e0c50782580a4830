"""The built-in worker (`python -m supervisor.worker`) as a real process."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from core_bus.envelope import Envelope
from core_bus.publish import publish_envelope
from supervisor.runtime.notify import NotifyMessage, NotifyServer
from supervisor.runtime.process import ChildProcess
from supervisor.worker import EXIT_BOOT_FAILURE, EXIT_ORPHANED, heartbeat_interval
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

SLOW_HANDLER = """
import anyio

async def handle(env, redis):
    await redis.sadd("worker:started", env.envelope_id)
    await anyio.sleep(float(env.content))
    await redis.sadd("worker:done", env.envelope_id)
"""


def worker_env(
    tmp_path: Path, redis_url: str, notify: str, handler: str, **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        {
            "AG1_AGENT": "w",
            "AG1_WORKER": "w/0",
            "AG1_HANDLER": handler,
            "AG1_GROUP": "w",
            "AG1_CONSUMER": "test:w:0:1",
            "AG1_STREAMS": "AG1:agent:w:inbox",
            "AG1_WORKING_DIR": str(tmp_path),
            "AG1_WATCHDOG_USEC": "400000",
            "AG1_DRAIN_TIMEOUT": "10",
            "AG1_LOG_FORMAT": "json",
            "REDIS_URL": redis_url,
            "NOTIFY_SOCKET": notify,
        }
    )
    env.update(extra)
    return env


async def test_worker_started_by_a_dead_supervisor_leaves_at_once(
    tmp_path: Path, python_exe: str
) -> None:
    """AG1_SUPERVISOR_PID is not our parent (it died before we armed PDEATHSIG): exit 4."""
    env = dict(os.environ, AG1_SUPERVISOR_PID="1")
    async with ChildProcess.spawn(
        [python_exe, "-m", "supervisor.worker"], env=env, cwd=tmp_path, pdeathsig="child"
    ) as child:
        with anyio.fail_after(20):
            status = await child.wait()
    assert status.code == EXIT_ORPHANED


def test_heartbeat_interval() -> None:
    """Heartbeats at half the watchdog, never slower than once a second."""
    assert heartbeat_interval(None) == 1.0
    assert heartbeat_interval(0.4) == 0.2
    assert heartbeat_interval(10.0) == 1.0


async def _messages(server: NotifyServer, until: Any, timeout: float = 20) -> list[NotifyMessage]:
    got: list[NotifyMessage] = []
    with anyio.fail_after(timeout):
        while not until(got):
            await anyio.wait_readable(server.sock)
            got.extend(server.receive_ready())
    return got


@pytest.mark.timeout(60)
async def test_ready_heartbeat_and_sigterm_drain(
    tmp_path: Path, redis: Any, redis_url: str, python_exe: str
) -> None:
    """READY once subscribed; WATCHDOG=1 with stats; SIGTERM finishes in-flight work, exit 0."""
    (tmp_path / "slow_agent.py").write_text(SLOW_HANDLER)
    with NotifyServer() as server:
        env = worker_env(tmp_path, redis_url, server.address, "slow_agent:handle")
        async with ChildProcess.spawn(
            [python_exe, "-m", "supervisor.worker"], env=env, cwd=tmp_path
        ) as child:
            got = await _messages(server, lambda ms: any(m.ready for m in ms))
            assert all(m.pid == child.pid for m in got)
            envelope = Envelope(role="user", content=1.0)
            await publish_envelope(redis, "AG1:agent:w:inbox", envelope)
            await eventually(lambda: redis.sismember("worker:started", envelope.envelope_id))
            beats = await _messages(server, lambda ms: sum(m.watchdog for m in ms) >= 2)
            stats = json.loads(next(m for m in reversed(beats) if m.stats).stats or "{}")
            assert "processed" in stats and "in_flight" in stats
            child.signal_group(signal.SIGTERM)
            with anyio.fail_after(20):
                status = await child.wait()
    assert status.code == 0
    assert await redis.sismember("worker:done", envelope.envelope_id)
    pending = await redis.xpending("AG1:agent:w:inbox", "w")
    assert pending["pending"] == 0


@pytest.mark.parametrize(
    ("handler", "source", "needle"),
    [
        ("missing_mod:handle", None, "cannot import handler module"),
        ("sync_agent:handle", "def handle(env):\n    pass\n", "not an async function"),
        ("attr_agent:nope", "async def handle(env):\n    pass\n", "has no 'nope'"),
        ("boom_agent:handle", "raise RuntimeError('broken at import')\n", "broken at import"),
    ],
)
async def test_bad_handler_exits_3_with_one_line(
    tmp_path: Path,
    redis_url: str,
    python_exe: str,
    handler: str,
    source: str | None,
    needle: str,
) -> None:
    """A handler that cannot be loaded is a boot failure: exit 3, one clear log line."""
    if source is not None:
        (tmp_path / f"{handler.split(':')[0]}.py").write_text(source)
    with NotifyServer() as server:
        env = worker_env(tmp_path, redis_url, server.address, handler)
        async with ChildProcess.spawn(
            [python_exe, "-m", "supervisor.worker"], env=env, cwd=tmp_path
        ) as child:
            assert child.stderr_fd is not None
            with anyio.fail_after(20):
                status = await child.wait()
            err = b""
            while chunk := os.read(child.stderr_fd, 65536):
                err += chunk
    assert status.code == EXIT_BOOT_FAILURE
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert event["event"] == "worker boot failed" and needle in event["error"]
    assert "Traceback" not in err.decode()


@pytest.mark.timeout(60)
async def test_sigterm_before_ready_exits_promptly(tmp_path: Path, python_exe: str) -> None:
    """Redis unreachable, so never ready: SIGTERM still ends the worker quickly with 0."""
    (tmp_path / "slow_agent.py").write_text(SLOW_HANDLER)
    with NotifyServer() as server:
        env = worker_env(
            tmp_path,
            "redis://127.0.0.1:1/0",
            server.address,
            "slow_agent:handle",
            AG1_DRAIN_TIMEOUT="2",
        )
        async with ChildProcess.spawn(
            [python_exe, "-m", "supervisor.worker"], env=env, cwd=tmp_path
        ) as child:
            assert child.stderr_fd is not None
            # Wait until the runtime is up (it logs once it starts connecting).
            with anyio.fail_after(20):
                await anyio.wait_readable(child.stderr_fd)
            child.signal_group(signal.SIGTERM)
            with anyio.fail_after(10):
                status = await child.wait()
            got = server.receive_ready()
    assert status.code == 0
    assert not any(m.ready for m in got)
