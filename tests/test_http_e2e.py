"""The operations surface against a real `ag1-fleet run` subprocess and a real Redis.

The CLI runs as a subprocess, probes and metrics go through real HTTP, workers
are real processes. Covers: status/scale/stop/start and errors through the CLI,
/metrics through promtool, tokens, a rolling restart under continuous
publishing (nothing lost, /readyz 200 throughout), reload with
changed/added/removed/unchanged agents (pids checked) and an invalid reload
that keeps the old plan.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import publish_many
from tests.fleet_harness import FleetProcess, agent_toml, listening_fleet
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")

HANDLER = """
import asyncio


async def handle(env, redis):
    await asyncio.sleep(0.005)
    await redis.sadd("e2e:seen", env.envelope_id)
"""


class RealFleet(FleetProcess):
    """`ag1-fleet run -c fleet.toml` in its own session, stopped with SIGTERM on close."""

    def __init__(self, tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> None:
        super().__init__(tmp_path, toml, env, graceful=True)


real_fleet = listening_fleet


def header(redis_url: str, request_timeout: str = "25s") -> str:
    return f"""
    [supervisor]
    name = "e2e"
    stop_timeout = "5s"
    sweep_interval = "1s"
    [redis]
    url = "{redis_url}"
    [http]
    listen = "127.0.0.1:0"
    request_timeout = "{request_timeout}"
    """


def sleeper(name: str, replicas: int = 1, extra: str = "") -> str:
    """A command agent that counts as ready after 0.2 s (cheap on a busy machine)."""
    return f"""
    [[agents]]
    name = "{name}"
    command = ["sh", "-c", "exec sleep 600"]
    replicas = {replicas}
    start_seconds = "200ms"
    stop_timeout = "2s"
    {extra}
    """


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json()


async def status(fleet: FleetProcess) -> dict[str, Any]:
    code, body = await get_json(fleet.url + "/status")
    assert code == 200
    return body  # type: ignore[no-any-return]


async def pids(fleet: FleetProcess) -> dict[str, set[int]]:
    snap = await status(fleet)
    return {
        a["name"]: {w["pid"] for w in a["workers"] if w["pid"] is not None} for a in snap["agents"]
    }


async def ready_counts(fleet: FleetProcess) -> dict[str, tuple[int, int]]:
    snap = await status(fleet)
    return {a["name"]: (a["ready_replicas"], a["desired_replicas"]) for a in snap["agents"]}


async def cli(*argv: str, token: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    for name in ("AG1_CONTROL_TOKEN", "AG1_HTTP__TOKEN", "AG1_CONFIG"):
        env.pop(name, None)
    if token is not None:
        env["AG1_CONTROL_TOKEN"] = token
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "supervisor.cli.main", *argv], env=env, check=False, cwd=ROOT
        )


async def wait_fleet_ready(fleet: FleetProcess, timeout: float = 40) -> None:
    async def ready() -> bool:
        code, _ = await get_json(fleet.url + "/readyz")
        return code == 200

    await eventually(ready, timeout, interval=0.1, message="/readyz 200")


# ----------------------------------------------------------------------------- basics


@pytest.mark.timeout(90)
async def test_cli_status_scale_stop_start_against_the_daemon(
    tmp_path: Path, redis_url: str, redis: Any
) -> None:
    """The CLI drives a real supervisor: status table, scale, stop/start, unknown agent."""
    toml = header(redis_url) + sleeper("alpha") + sleeper("beta", 2)
    with real_fleet(tmp_path, toml) as fleet:
        await wait_fleet_ready(fleet)
        result = await cli("status", "--url", fleet.url)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().splitlines()
        assert any(line.split()[:3] == ["alpha", "running", "1/1"] for line in lines)
        assert any(line.split()[:3] == ["beta", "running", "2/2"] for line in lines)
        assert sum(1 for line in lines if line.startswith(("alpha/", "beta/"))) == 3

        result = await cli("scale", "alpha", "3", "--url", fleet.url)
        assert (result.returncode, result.stdout) == (0, b"scaled alpha to 3 replicas\n")
        await eventually(
            lambda: _counts_are(fleet, alpha=(3, 3)), 20, interval=0.1, message="3 alpha ready"
        )
        result = await cli("stop", "beta", "--url", fleet.url)
        assert (result.returncode, result.stdout) == (0, b"stopped beta\n"), result.stderr
        snap = await status(fleet)
        beta = next(a for a in snap["agents"] if a["name"] == "beta")
        assert beta["state"] == "stopped"
        assert (await get_json(fleet.url + "/readyz"))[0] == 200  # stopped on purpose

        result = await cli("start", "beta", "--url", fleet.url)
        assert (result.returncode, result.stdout) == (0, b"started beta\n")
        await eventually(lambda: _counts_are(fleet, beta=(2, 2)), 20, interval=0.1)

        result = await cli("restart", "ghost", "--url", fleet.url)
        assert result.returncode == 1
        assert result.stderr.decode().strip() == "ag1-fleet restart: unknown agent 'ghost'"


async def _counts_are(fleet: FleetProcess, **expected: tuple[int, int]) -> bool:
    counts = await ready_counts(fleet)
    return all(counts.get(name) == want for name, want in expected.items())


@pytest.mark.timeout(90)
async def test_metrics_and_token_on_a_real_supervisor(
    tmp_path: Path, redis_url: str, redis: Any
) -> None:
    """A real /metrics passes promtool; with AG1_CONTROL_TOKEN set control needs it, GETs not."""
    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    toml = header(redis_url) + agent_toml("echo", handler="e2e_agent:handle", replicas=1)
    with real_fleet(tmp_path, toml, env={"AG1_CONTROL_TOKEN": "e2e-token"}) as fleet:
        await wait_fleet_ready(fleet)
        stream = StreamKeyBuilder().agent_inbox("echo")
        await publish_many(redis, stream, [Envelope(role="user", content=i) for i in range(50)])

        async def processed() -> bool:
            snap = await status(fleet)
            return bool(snap["agents"][0]["messages"]["processed"] >= 50)

        await eventually(processed, 30, interval=0.2, message="50 processed and reported")
        async with (
            aiohttp.ClientSession() as session,
            session.get(fleet.url + "/metrics") as resp,
        ):
            text = await resp.text()
        assert 'ag1_messages_processed_total{agent="echo"}' in text
        assert 'ag1_handler_duration_seconds_bucket{agent="echo",le="+Inf"}' in text
        assert "ag1_redis_up 1.0" in text
        if PROMTOOL is not None:
            check = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr

        denied = await cli("scale", "echo", "2", "--url", fleet.url)
        assert denied.returncode == 1
        assert b"unauthorized" in denied.stderr
        allowed = await cli("scale", "echo", "2", "--url", fleet.url, token="e2e-token")
        assert allowed.returncode == 0, allowed.stderr
        assert (await cli("status", "--url", fleet.url)).returncode == 0


# ----------------------------------------------------------------------------- rolling restart


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_rolling_restart_under_load_loses_nothing_and_stays_ready(
    tmp_path: Path, redis_url: str, redis: Any
) -> None:
    """`restart --rolling` while publishing: every worker replaced, every envelope handled,
    nothing pending or dead-lettered, and /readyz answered 200 on every poll."""
    (tmp_path / "e2e_agent.py").write_text(HANDLER)
    toml = header(redis_url) + agent_toml(
        "roll",
        handler="e2e_agent:handle",
        replicas=3,
        concurrency=8,
        count=20,
        max_surge=1,
        max_unavailable=0,
        stop_timeout="5s",
        claim_idle="10s",
    )
    keys = StreamKeyBuilder()
    stream = keys.agent_inbox("roll")
    with real_fleet(tmp_path, toml) as fleet:
        await wait_fleet_ready(fleet)
        before = (await pids(fleet))["roll"]
        assert len(before) == 3
        published: list[str] = []
        probes: list[int] = []
        stop = anyio.Event()

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                batch = [Envelope(role="user", content=n + i) for i in range(10)]
                n += 10
                await publish_many(redis, stream, batch)
                published.extend(e.envelope_id for e in batch)
                await anyio.sleep(0.01)

        async def probe() -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.get(fleet.url + "/readyz") as resp:
                        probes.append(resp.status)
                    await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            tg.start_soon(probe)
            await eventually(lambda: len(published) >= 300, 20, message="steady publishing")
            result = await cli("restart", "roll", "--rolling", "--url", fleet.url)
            stop.set()
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"rolling restart of roll done\n"

        after = (await pids(fleet))["roll"]
        assert len(after) == 3 and not (after & before), (before, after)
        assert probes and all(code == 200 for code in probes), probes

        async def all_seen() -> bool:
            return int(await redis.scard("e2e:seen")) == len(set(published))

        await eventually(all_seen, 60, interval=0.2, message="every envelope handled")

        async def nothing_pending() -> bool:
            return int((await redis.xpending(stream, "roll"))["pending"]) == 0

        await eventually(nothing_pending, 30, interval=0.2, message="nothing pending")
        assert await redis.xlen(keys.dead_letter("roll")) == 0
        print(f"ROLL published={len(published)} probes={len(probes)}")


# ----------------------------------------------------------------------------- reload


@pytest.mark.timeout(120)
async def test_reload_applies_diff_and_rejects_invalid_file(
    tmp_path: Path, redis_url: str, redis: Any
) -> None:
    """`ag1-fleet reload`: unchanged keep pids, changed get new ones, added start, removed stop,
    scaled keep theirs plus new; an invalid file is rejected and nothing changes."""
    base = (
        header(redis_url)
        + sleeper("keep")
        + sleeper("change", extra='env = { VERSION = "1" }')
        + sleeper("remove")
        + sleeper("grow")
    )
    with real_fleet(tmp_path, base) as fleet:
        await wait_fleet_ready(fleet)
        old = await pids(fleet)
        fleet.write(
            header(redis_url)
            + sleeper("keep")
            + sleeper("change", extra='env = { VERSION = "2" }')
            + sleeper("grow", 2)
            + sleeper("added")
        )
        result = await cli("reload", "--url", fleet.url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            b"reloaded: added added; removed remove; changed change; scaled grow; 1 unchanged\n"
        )

        async def applied() -> bool:
            counts = await ready_counts(fleet)
            return counts == {"keep": (1, 1), "change": (1, 1), "grow": (2, 2), "added": (1, 1)}

        await eventually(applied, 30, interval=0.1, message="reload applied")
        new = await pids(fleet)
        assert new["keep"] == old["keep"]
        assert new["change"] and not (new["change"] & old["change"])
        assert old["grow"] < new["grow"] and len(new["grow"]) == 2
        assert "remove" not in new
        assert new["added"]

        # An invalid file: rejected, explained, nothing touched.
        fleet.write(header(redis_url) + sleeper("keep", -1) + sleeper("change"))
        result = await cli("reload", "--url", fleet.url)
        assert result.returncode == 1
        err = result.stderr.decode()
        assert err.startswith("ag1-fleet reload: reload rejected, the old plan keeps running: ")
        assert "agents[0].replicas" in err and "Traceback" not in err
        assert await pids(fleet) == new
        snap = await status(fleet)
        assert "agents[0].replicas" in (snap["last_reload_error"] or "")
        assert (await get_json(fleet.url + "/readyz"))[0] == 200
        async with (
            aiohttp.ClientSession() as session,
            session.get(fleet.url + "/metrics") as resp,
        ):
            assert "ag1_config_last_reload_success 0.0" in await resp.text()


# Keep the helper importable by the sd_notify test without pytest collecting it twice.
__all__ = ["RealFleet", "header", "real_fleet", "sleeper"]
