"""``ag1-fleet check`` through the real CLI in a subprocess: exit codes, stdout, stderr."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_config_load import CONFIGS, expected_problems

ROOT = Path(__file__).resolve().parent.parent


def run_check(
    python_exe: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("AG1_")}
    child_env.update(env or {})
    return subprocess.run(
        [python_exe, "-m", "supervisor.cli.main", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=child_env,
        check=False,
    )


@pytest.mark.parametrize(
    "name", ["many_problems", "toml_syntax", "handler_import_raises", "password_in_url"]
)
def test_invalid_file_exit_2_with_exact_lines(python_exe: str, name: str) -> None:
    """Invalid: exactly the expected lines on stderr, nothing on stdout, exit 2, no traceback."""
    path = f"tests/configs/invalid/{name}.toml"
    result = run_check(python_exe, "-c", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == expected_problems(ROOT / path, path)


def test_missing_file_exit_2(python_exe: str) -> None:
    """A missing config is one line and exit 2 (the default path is ./fleet.toml)."""
    result = run_check(python_exe, "-c", "does/not/exist.toml")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "does/not/exist.toml: file not found (pass the file with -c PATH or set AG1_CONFIG)\n"
    )


def test_valid_file_prints_readable_plan(python_exe: str) -> None:
    """Valid: exit 0 and a plan naming agents, workers, groups, streams and restart policy."""
    result = run_check(python_exe, "-c", str(CONFIGS / "valid.toml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK: 4 agents, 6 workers" in out
    assert "start order echo, script  ->  obj  ->  sharded-one" in out
    assert "workers   echo/0, echo/1, echo/2" in out
    assert "group     sharded-one  shards=4 ordered" in out
    assert "streams   T1:custom:a, T1:custom:b" in out
    assert "restart   on-failure, backoff 500ms..30s, at most 5 starts in 1m" in out
    assert "workers   none (replicas = 0)" in out
    assert "fixture_handlers: printing" not in out  # handler prints never leak


def test_json_plan_and_env_override(python_exe: str) -> None:
    """--json prints the resolved plan; env overrides apply; the password never appears."""
    result = run_check(
        python_exe,
        "-c",
        str(CONFIGS / "valid.toml"),
        "--json",
        env={"AG1_AGENTS__ECHO__REPLICAS": "1", "REDIS_PASSWORD": "hunter2"},
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    data = json.loads(result.stdout)
    assert data["redis"]["password_set"] is True
    assert data["redis"]["url"] == "redis://:***@127.0.0.1:6390/2"
    assert data["start_order"] == [["echo", "script"], ["obj"], ["sharded-one"]]
    echo = data["agents"][0]
    assert echo["name"] == "echo" and echo["workers"] == ["echo/0"]
    assert echo["kind"] == "handler"
    assert echo["dlq_stream"] == "T1:dlq:echo"
    assert echo["stop_timeout"] == 10.0
    assert echo["env"] == {"SHARED": "***"}


def test_invalid_env_override_via_cli(python_exe: str) -> None:
    """An env override error names the variable and exits 2."""
    result = run_check(
        python_exe, "-c", str(CONFIGS / "valid.toml"), env={"AG1_AGENTS__ECHO__REPLICAS": "-1"}
    )
    assert result.returncode == 2
    assert result.stderr == "AG1_AGENTS__ECHO__REPLICAS: agents[0].replicas: must be >= 0\n"


def test_check_warns_about_after_a_zero_replica_agent(tmp_path: Path, python_exe: str) -> None:
    """`after` naming a replicas = 0 agent is legal (it counts as satisfied) but
    pointless: `check` prints one warning line on stderr and still exits 0."""
    (tmp_path / "h.py").write_text("async def handle(env):\n    return None\n")
    config = tmp_path / "fleet.toml"
    config.write_text(
        """
[[agents]]
name = "idle"
handler = "h:handle"
replicas = 0

[[agents]]
name = "main"
handler = "h:handle"
after = ["idle"]
"""
    )
    result = subprocess.run(
        [python_exe, "-m", "supervisor.cli.main", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"warning: {config}: agents[1].after: 'idle' has replicas = 0, "
        "so waiting for it does nothing"
    ]
