"""Bounds and NUL bytes: `check` refuses what would break a running fleet, in one line each.

Every case here was accepted (or crashed with a traceback) before: 10**12
replicas, ``replicas = true`` read as 1, ``"1000000000h"``, ``stop_timeout =
1e300``, a 10,000-character name, a TOML file nested 600 deep, an ``env`` value
or stream name holding a NUL byte (also through a JSON ``AG1_`` override). The
limits hold on reload and for the control API's ``scale`` as well.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from supervisor.config.load import ConfigError, load_config
from supervisor.fleet.snapshot import ControlError
from tests.fleet_harness import agent, agent_toml, cmd, run_toml, running
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
SLEEP = "import time; time.sleep(60)"

pytestmark = pytest.mark.timeout(60)


def _fleet(tmp_path: Path, agents: str, supervisor: str = "", **env: str) -> list[str]:
    path = tmp_path / "fleet.toml"
    path.write_text("[supervisor]\nname = 'limits'\n" + supervisor + textwrap.dedent(agents))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env, check_imports=False)
    return [line.removeprefix(f"{path}: ") for line in info.value.problems]


AGENT = '[[agents]]\nname = "a"\ncommand = ["sleep", "1"]\n'


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "replicas = 1000000000000",
            "agents[0]: replicas (1000000000000) is more than max_replicas (64)",
        ),
        ("replicas = true", "agents[0].replicas: must be an integer, not true"),
        ("count = 1000000000000", "agents[0].count: must be <= 10000"),
        ("concurrency = 0", "agents[0].concurrency: must be >= 1"),
        (
            'claim_idle = "1000000000h"',
            "agents[0].claim_idle: duration 3.6e+12s is too long: at most 30 days",
        ),
        ("stop_timeout = 1e300", "agents[0].stop_timeout: must be <= 3600"),
        ('stop_timeout = "2h"', "agents[0].stop_timeout: must be <= 3600"),
        ("max_deliveries = false", "agents[0].max_deliveries: must be an integer, not false"),
        ("shards = 100000", "agents[0].shards: must be <= 1024"),
        ('env = { A = "x\\u0000y" }', "agents[0].env: contains a NUL byte in A"),
        ('streams = ["ok", "a\\u0000b"]', "agents[0].streams: contains a NUL byte in item 1"),
        ('group = "g\\u0000"', "agents[0].group: contains a NUL byte"),
        ('command = ["sleep", "1\\u0000"]', "agents[0].command: contains a NUL byte in item 1"),
        ('working_dir = "/tmp/\\u0000"', "agents[0].working_dir: contains a NUL byte"),
        ('env = { A = "line\\nbreak" }', "agents[0].env: contains control character '\\n' in A"),
    ],
)
def test_out_of_bounds_settings_are_one_clear_line(
    tmp_path: Path, setting: str, expected: str
) -> None:
    base = AGENT if not setting.startswith("command") else '[[agents]]\nname = "a"\n'
    problems = _fleet(tmp_path, base + setting + "\n")
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_a_10000_character_name_is_refused(tmp_path: Path) -> None:
    problems = _fleet(tmp_path, f'[[agents]]\nname = "{"n" * 10_000}"\ncommand = ["true"]\n')
    assert "agents[0].name: is too long: at most 64 characters" in problems


def test_fleet_wide_max_workers(tmp_path: Path) -> None:
    agents = "".join(
        f'[[agents]]\nname = "a{i}"\ncommand = ["true"]\nreplicas = 60\n' for i in range(3)
    )
    problems = _fleet(tmp_path, agents, "max_workers = 100\n")
    assert problems == [
        "supervisor.max_workers: the agents ask for 180 workers, more than max_workers (100); "
        "lower replicas or raise max_workers"
    ], problems


def test_nul_through_a_json_environment_override(tmp_path: Path) -> None:
    problems = _fleet(
        tmp_path,
        AGENT,
        AG1_AGENTS__A__STREAMS='["AG1:x", "AG1:y\\u0000"]',
        AG1_AGENTS__A__ENV='{"K": "v\\u0000"}',
    )
    assert "AG1_AGENTS__A__STREAMS: agents[0].streams: contains a NUL byte in item 1" in problems
    assert "AG1_AGENTS__A__ENV: agents[0].env: contains a NUL byte in K" in problems


def _check(python_exe: str, path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("AG1_")}
    return subprocess.run(
        [python_exe, "-m", "supervisor.cli.main", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**child_env, **env},
        check=False,
    )


@pytest.mark.parametrize(
    ("body", "env", "expected"),
    [
        (
            AGENT + "env = { X = " + "[" * 600 + "]" * 600 + " }\n",
            {},
            "invalid TOML: nested too deeply",
        ),
        ("x = " + "{a = " * 600 + "1" + "}" * 600 + "\n", {}, "invalid TOML: nested too deeply"),
        (AGENT + 'env = { A = "x\\u0000y" }\n', {}, "agents[0].env: contains a NUL byte in A"),
        (
            AGENT,
            {"AG1_AGENTS__A__ENV": "[" * 30_000 + "]" * 30_000},
            "AG1_AGENTS__A__ENV: invalid JSON value: nested too deeply",
        ),
        (
            AGENT,
            {"AG1_AGENTS__A__REPLICAS": "9" * 5000},
            "AG1_AGENTS__A__REPLICAS: agents[0]",
        ),
    ],
    ids=["deep-array", "deep-table", "env-nul", "deep-json-override", "5000-digit-override"],
)
def test_check_cli_is_one_line_exit_2_never_a_traceback(
    tmp_path: Path, python_exe: str, body: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(body)
    result = _check(python_exe, path, **env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert any(expected in line for line in lines), lines
    assert len(lines) <= 3, lines


# -- the running fleet: reload and the control API hold the same limits -------------------


@pytest.mark.anyio
async def test_reload_with_a_nul_stream_is_rejected_and_the_fleet_keeps_running(
    tmp_path: Path, redis_url: str, python_exe: str
) -> None:
    toml = run_toml(
        agent_toml("sleepy", cmd(python_exe, SLEEP), bus=True),
        name="nulreload",
        url=redis_url,
        stop_timeout="5s",
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "sleepy").ready_replicas == 1, timeout=30)
        pids = {w.pid for w in agent(daemon, "sleepy").workers}
        (tmp_path / "fleet.toml").write_text(
            textwrap.dedent(toml) + '    streams = ["AG1:ok", "AG1:bad\\u0000"]\n'
        )
        result = await daemon.control.reload()
        assert not result.ok
        assert any("contains a NUL byte" in e for e in result.errors), result.errors
        assert {w.pid for w in agent(daemon, "sleepy").workers} == pids
        assert agent(daemon, "sleepy").ready_replicas == 1


@pytest.mark.anyio
async def test_scale_beyond_the_limits_is_refused_by_the_api(
    tmp_path: Path, redis_url: str, python_exe: str
) -> None:
    toml = run_toml(
        agent_toml("sleepy", cmd(python_exe, SLEEP), max_replicas=3),
        agent_toml("other", cmd(python_exe, SLEEP)),
        name="scalelimits",
        url=redis_url,
        listen="127.0.0.1:0",
        stop_timeout="5s",
        max_workers=4,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "sleepy").ready_replicas == 1, timeout=30)
        with pytest.raises(ControlError, match="max_replicas"):
            await daemon.control.scale_agent("sleepy", 4)
        assert daemon.http_address is not None
        host, port = daemon.http_address
        url = f"http://{host}:{port}/v1/agents/sleepy/scale"
        answers: dict[Any, tuple[int, Any]] = {}
        async with aiohttp.ClientSession() as session:
            for replicas in (10**12, 4, True, 3):
                async with session.post(url, json={"replicas": replicas}) as resp:
                    answers[replicas] = (resp.status, await resp.json())
        assert answers[10**12][0] == 409 and "max_replicas (3)" in answers[10**12][1]["error"]
        assert answers[True][0] == 400
        assert answers[3] == (200, {"action": "scale", "agent": "sleepy", "ok": True})
        assert agent(daemon, "sleepy").desired_replicas == 3
        async with aiohttp.ClientSession() as session:
            other = url.replace("sleepy", "other")
            async with session.post(other, json={"replicas": 2}) as resp:
                assert resp.status == 409
                assert "max_workers (4)" in (await resp.json())["error"]
