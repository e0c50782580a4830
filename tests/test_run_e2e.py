"""`ag1-fleet run` as a real subprocess: end to end through Redis, signals, no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from core_bus.envelope import Envelope
from core_bus.publish import publish_envelope
from tests.fleet_harness import FleetProcess, agent_toml, cmd, gone, run_toml
from tests.waiting import eventually, eventually_sync

pytestmark = pytest.mark.anyio

ECHO = agent_toml("echo", handler="e2e_agent:handle", replicas=2)
SLEEP = "import time; time.sleep(600)"
NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there: Redis stays down

HANDLER = """
from typing import Any

async def handle(env: Any, redis: Any) -> None:
    await redis.sadd("e2e:seen", env.envelope_id)
"""


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Any]:
    fleets: list[FleetProcess] = []

    def start(toml: str, env: dict[str, str] | None = None) -> FleetProcess:
        fleet = FleetProcess(tmp_path, toml, env)
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        fleet.close()


@pytest.mark.timeout(60)
async def test_run_processes_messages_end_to_end(
    fleet_factory: Any, tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """Publish to a handler agent: every envelope handled; SIGTERM exits 0, no leftovers."""
    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    fleet = fleet_factory(run_toml(ECHO, name="e2e", url=redis_url))
    fleet.wait_event("fleet ready", timeout=30)
    pids = fleet.worker_pids()
    assert len(pids) == 2
    ids = []
    for i in range(20):
        env = Envelope(role="user", content=i)
        ids.append(env.envelope_id)
        await publish_envelope(redis, "AG1:agent:echo:inbox", env)
    await eventually(lambda: redis.scard("e2e:seen"), timeout=15, message="envelopes handled")
    await eventually(lambda: _count_is(redis, 20), timeout=15, message="all 20 envelopes handled")
    started = fleet.find("supervisor started")[0]
    sock_dir = Path(started["notify_socket"]).parent
    assert sock_dir.exists()

    fleet.stop(20, pids)
    assert not sock_dir.exists(), "notify socket left behind"
    exits = fleet.find("worker exited", agent="echo")
    assert {e["reason"] for e in exits} == {"exit 0"}
    # Nothing left pending: the workers drained and acked.
    info = await redis.xpending("AG1:agent:echo:inbox", "echo")
    assert info["pending"] == 0


async def _count_is(redis: Any, n: int) -> bool:
    return int(await redis.scard("e2e:seen")) == n


@pytest.mark.timeout(60)
def test_supervisor_sigkill_leaves_no_children(
    fleet_factory: Any, tmp_path: Path, python_exe: str, redis_url: str
) -> None:
    """SIGKILL the supervisor: the parent-death signal takes every worker down with it,
    command agents (armed through setpriv) and built-in workers (armed by themselves)."""
    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    fleet = fleet_factory(
        run_toml(
            agent_toml("sleepy", cmd(python_exe, SLEEP), replicas=3, start_seconds="100ms"),
            ECHO,
            name="orphans",
            url=redis_url,
        )
    )
    fleet.wait_event("fleet ready", timeout=30)
    pids = fleet.worker_pids()
    assert len(pids) == 5
    fleet.proc.send_signal(signal.SIGKILL)
    fleet.proc.wait(10)
    eventually_sync(lambda: gone(pids), timeout=5, message="workers gone after supervisor SIGKILL")


@pytest.mark.timeout(60)
def test_second_sigterm_stops_at_once(fleet_factory: Any, python_exe: str) -> None:
    """A worker ignoring SIGTERM with a long stop_timeout: the second SIGTERM kills it now."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    fleet = fleet_factory(
        run_toml(
            agent_toml(
                "stubborn", cmd(python_exe, code), start_seconds="200ms", stop_timeout="60s"
            ),
            name="twice",
            url=NO_REDIS,
        )
    )
    fleet.wait_event("fleet ready", timeout=30)
    pids = fleet.worker_pids()
    fleet.proc.send_signal(signal.SIGTERM)
    fleet.wait_event("stop requested")
    assert fleet.proc.poll() is None  # the worker ignores SIGTERM; stop_timeout is 60 s
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.proc.wait(10) == 0
    assert gone(pids)
    (exit_event,) = fleet.find("worker exited", agent="stubborn")
    assert exit_event["reason"] == "signal SIGKILL"


@pytest.mark.timeout(60)
def test_invalid_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    """`run` refuses an invalid file like `check` does: exit 2, problems on stderr."""
    config = tmp_path / "fleet.toml"
    config.write_text('[[agents]]\nname = "x"\ncommand = ["true"]\nreplicas = -1\n')
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.cli.main", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "replicas" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
async def test_http_probes_and_rolling_restart_over_the_api(
    fleet_factory: Any, tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """With [http] on: /readyz turns 200, /status lists workers, a rolling restart through
    the control API replaces every pid while /readyz stays 200 and publishing goes on
    without losing an envelope."""
    import aiohttp

    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    fleet = fleet_factory(run_toml(ECHO, name="http", url=redis_url, listen="127.0.0.1:0"))
    started = fleet.wait_event("supervisor started", timeout=30)
    base = f"http://{started['http']}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def ready() -> bool:
            async with http.get(f"{base}/readyz") as resp:
                return resp.status == 200

        await eventually(ready, timeout=30, message="/readyz 200")
        async with http.get(f"{base}/status") as resp:
            status = await resp.json()
        (echo,) = [a for a in status["agents"] if a["name"] == "echo"]
        old = {w["pid"] for w in echo["workers"]}
        assert len(old) == 2 and None not in old

        probes: list[int] = []
        done = False

        async def probe() -> None:
            while not done:
                async with http.get(f"{base}/readyz") as resp:
                    probes.append(resp.status)
                await anyio.sleep(0.02)

        published: list[str] = []

        async def publish() -> None:
            while not done:
                env = Envelope(role="user", content=len(published))
                await publish_envelope(redis, "AG1:agent:echo:inbox", env)
                published.append(env.envelope_id)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            tg.start_soon(publish)
            async with http.post(f"{base}/v1/agents/echo/restart", json={"rolling": True}) as resp:
                assert resp.status in (200, 202), await resp.text()

            async def replaced() -> bool:
                async with http.get(f"{base}/status") as resp:
                    data = await resp.json()
                (agent,) = [a for a in data["agents"] if a["name"] == "echo"]
                pids = {w["pid"] for w in agent["workers"]}
                return agent["ready_replicas"] == 2 and len(pids) == 2 and not (pids & old)

            await eventually(replaced, timeout=40, message="all workers replaced")
            done = True
        assert probes and set(probes) == {200}
        # Publishing went on through the roll: every envelope handled, none left pending.
        await eventually(
            lambda: _count_is(redis, len(published)), timeout=20, message="all handled"
        )
        assert len(published) > 20


@pytest.mark.timeout(90)
def test_embedded_redis_starts_first_and_stops_last(fleet_factory: Any, tmp_path: Path) -> None:
    """url = "embedded": the bundled redis-server runs before the workers and is stopped
    after them; a handler agent becomes ready against it."""
    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    fleet = fleet_factory(
        run_toml(
            agent_toml("echo", handler="e2e_agent:handle"),
            name="emb",
            url="embedded",
            state_dir=str(tmp_path / "state"),
        )
    )
    fleet.wait_event("fleet ready", timeout=60)
    tree = psutil.Process(fleet.proc.pid).children()
    names = {p.name() for p in tree}
    assert any("redis" in n or "valkey" in n for n in names), names
    pids = {p.pid for p in tree}
    fleet.stop(30, pids)
    exits = fleet.find("worker exited", agent="echo")
    assert exits and exits[0]["reason"] == "exit 0"
    password = (tmp_path / "state" / "redis.password").read_text().strip()
    assert password and password not in fleet.log_path.read_text()  # never logged


@pytest.mark.timeout(60)
def test_refused_http_address_fails_before_any_worker(fleet_factory: Any, python_exe: str) -> None:
    """A non-loopback [http] listen without a token: exit 1 with one clear line, and no
    worker was ever started."""
    fleet = fleet_factory(
        run_toml(
            agent_toml("sleepy", cmd(python_exe, SLEEP)),
            name="refused",
            url=NO_REDIS,
            listen="0.0.0.0:0",
        ),
        env={"AG1_CONTROL_TOKEN": "", "AG1_HTTP__TOKEN": ""},
    )
    assert fleet.proc.wait(30) == 1
    (failure,) = fleet.find("supervisor cannot run")
    assert "without a token" in failure["error"]
    assert not fleet.find("worker started")
    assert "Traceback" not in fleet.log_path.read_text()
