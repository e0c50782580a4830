"""The README's quickstart, end to end, as a user would run it (keeps README.md true)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from supervisor.redis.server import pick_free_port
from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def _script(name: str) -> list[str]:
    """The console script installed next to the interpreter (as in .venv/bin/)."""
    path = BIN / name
    assert path.exists(), f"{path} missing: install with pip install -e '.[test]'"
    return [str(path)]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without any Redis settings (the fleet must find its own)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "AG1_", "NOTIFY_SOCKET", "BUS_"))
    }
    env.update(extra)
    return env


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _children(pid: int, recursive: bool = False) -> list[tuple[int, str, str]]:
    """(pid, name, command line) of a process's children; ones that exit meanwhile are skipped."""
    out: list[tuple[int, str, str]] = []
    for child in psutil.Process(pid).children(recursive=recursive):
        try:
            out.append((child.pid, child.name(), " ".join(child.cmdline())))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _is_redis(name: str) -> bool:
    return "redis-server" in name or "valkey-server" in name


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    """The Quickstart has exactly two commands; the test command is the one .ci/run runs."""
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 1
    commands = [line for line in blocks[0].splitlines() if line.strip()]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && "
        ".venv/bin/ag1-fleet run -c fleet.example.toml",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
    ]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_readme_links_point_at_existing_files() -> None:
    """Every relative link in README.md names a file or directory of the repository."""
    targets = re.findall(r"\]\(([^)#\s]+)\)", README.read_text())
    assert targets, "README has no links"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert missing == []


def _readme_cli_lines() -> list[list[str]]:
    """``ag1-bus`` / ``ag1-fleet`` invocations in the README's bash blocks, as argv lists."""
    lines: list[list[str]] = []
    for block in _code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].split(" | ", 1)[0].strip()
            for command in line.split(" && "):
                argv = shlex.split(command)
                if argv and argv[0] in (".venv/bin/ag1-bus", ".venv/bin/ag1-fleet"):
                    lines.append([Path(argv[0]).name, *argv[1:]])
    return lines


def test_readme_cli_commands_and_flags_exist() -> None:
    """Each ag1-bus / ag1-fleet subcommand and --flag shown in the README is in its --help."""
    lines = _readme_cli_lines()
    assert {argv[0] for argv in lines} == {"ag1-bus", "ag1-fleet"}
    for program, *args in lines:
        words = [a for a in args if not a.startswith("-")]
        depth = 2 if words[:1] == ["dlq"] else 1
        subcommand = words[:depth]
        result = subprocess.run(
            [*_script(program), *subcommand, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"{program} {subcommand}: {result.stderr}"
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            assert flag in result.stdout, f"{program} {' '.join(subcommand)} has no {flag}"


@pytest.mark.timeout(60)
def test_readme_bus_snippet_runs(redis_url: str, tmp_path: Path) -> None:
    """The "Using the bus from your agent" snippet runs as printed and receives its message."""
    [snippet] = [block for block in _code_blocks("python") if "subscribe(" in block]
    script = tmp_path / "my_agent.py"
    script.write_text(snippet)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_clean_env(REDIS_URL=redis_url, PYTHONPATH=str(ROOT), AG1_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "user {'hello': 'agent'}" in result.stdout


def _echo_round_trip(bus: list[str], env: dict[str, str], cid: str, count: int) -> dict[str, Any]:
    """README steps: ``ag1-bus publish`` to the echo agent, ``ag1-bus tail`` its reply stream.

    ``count`` is the number of replies expected on the stream so far; the last
    one must carry ``cid``.
    """
    reply_to = "AG1:user:quickstart:inbox"
    publish = [*bus, "publish", "AG1:agent:echo:inbox", "--reply-to", reply_to]
    publish += ["--content", '{"hello": "quickstart"}', "--correlation-id", cid]
    subprocess.run(publish, env=env, check=True, capture_output=True, timeout=30)
    tail = subprocess.run(
        [*bus, "tail", reply_to, "--from-start", "--json", "--count", str(count)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    reply: dict[str, Any] = json.loads(tail.stdout.strip().splitlines()[-1])["envelope"]
    assert reply["correlation_id"] == cid
    return reply


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quickstart_fleet_end_to_end(tmp_path: Path) -> None:
    """ag1-fleet run -c fleet.example.toml: embedded Redis, echo replies, /readyz 200,
    SIGTERM exits 0 and leaves no process (workers, shell agent, redis-server) behind.
    """
    state_dir = tmp_path / "state"
    http_port = pick_free_port()
    env = _clean_env(
        AG1_SUPERVISOR__STATE_DIR=str(state_dir),
        AG1_HTTP__LISTEN=f"127.0.0.1:{http_port}",
        AG1_LOG_FORMAT="json",
    )
    log_path = tmp_path / "fleet.log"
    with log_path.open("wb") as log_file:
        fleet = subprocess.Popen(
            [*_script("ag1-fleet"), "run", "-c", "fleet.example.toml"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    children: list[psutil.Process] = []
    try:

        def ready() -> bool:
            assert fleet.poll() is None, f"ag1-fleet exited early:\n{log_path.read_text()[-3000:]}"
            return _readyz(http_port) == 200

        eventually_sync(ready, timeout=60, interval=0.2, message="/readyz 200")
        url = (state_dir / "redis.url").read_text().strip()
        password = (state_dir / "redis.password").read_text().strip()
        assert url == f"unix://:{password}@{state_dir / 'redis.sock'}"

        bus = [*_script("ag1-bus"), "--state-dir", str(state_dir)]
        reply = _echo_round_trip(bus, env, "quickstart-1", count=1)
        assert reply["content"] == {"hello": "quickstart"}
        assert reply["agent_name"] == "echo"

        # a crashed embedded Redis comes back on the same URL and the fleet reconnects
        redis_pid = next(pid for pid, name, _ in _children(fleet.pid) if _is_redis(name))
        os.kill(redis_pid, signal.SIGKILL)
        eventually_sync(
            lambda: any(
                _is_redis(name) and pid != redis_pid for pid, name, _ in _children(fleet.pid)
            ),
            timeout=20,
            message="embedded redis-server restarted",
        )
        assert (state_dir / "redis.url").read_text().strip() == url
        eventually_sync(lambda: _pings(url), timeout=20, message="embedded redis answers")
        _echo_round_trip(bus, env, "quickstart-2", count=2)
        eventually_sync(lambda: _readyz(http_port) == 200, timeout=30, message="ready again")

        children = psutil.Process(fleet.pid).children(recursive=True)
        names = " ".join(cmdline for _, _, cmdline in _children(fleet.pid, recursive=True))
        assert _is_redis(names) and "shell_agent.sh" in names
        assert names.count("supervisor.worker") == 6  # echo 2, summarizer 2, planner, flaky

        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(60) == 0
        eventually_sync(
            lambda: all(_gone(p.pid) for p in children), timeout=10, message="children gone"
        )
        assert not (state_dir / "redis.url").exists()
        assert password not in log_path.read_text()  # never printed or logged
    finally:
        if fleet.poll() is None:
            fleet.kill()  # its children get their parent-death signal
            fleet.wait(10)
        for proc in children:
            if not _gone(proc.pid):
                proc.kill()
