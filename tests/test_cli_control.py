"""``ag1-fleet status/restart/scale/stop/start/reload`` as subprocesses against a real server.

The server is ``tests/test_http_fakes.py`` run as a module: the real aiohttp
server from ``supervisor.http.server`` with a stand-in daemon behind it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.cli.client import (
    ControlClientError,
    resolve_base_url,
    resolve_target,
    url_from_listen,
)
from supervisor.cli.control import format_status, reload_summary
from tests.test_http_fakes import agent, snapshot

ROOT = Path(__file__).resolve().parent.parent

Server = Callable[..., str]


def _read_port(proc: subprocess.Popen[bytes], deadline: float) -> int:
    """Read raw stdout (no buffering surprises with select) until the PORT line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buffer += chunk
        for line in buffer.decode(errors="replace").splitlines():
            if line.startswith("PORT ") and line.split()[1].isdigit():
                return int(line.split()[1])
    raise AssertionError(f"fake supervisor did not start (exit {proc.poll()}): {buffer!r}")


@pytest.fixture
def fake_server(python_exe: str) -> Iterator[Server]:
    """Start fake supervisors in subprocesses; each stops when its stdin closes."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str, token: str | None = None) -> str:
        env = {**os.environ, "AG1_LOG_LEVEL": "WARNING"}
        env.pop("AG1_CONTROL_TOKEN", None)
        if token:
            env["AG1_CONTROL_TOKEN"] = token
        proc = subprocess.Popen(
            [python_exe, "-m", "tests.test_http_fakes", *flags],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        port = _read_port(proc, time.monotonic() + 20)
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def cli(
    python_exe: str, *argv: str, token: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    for name in ("AG1_CONTROL_TOKEN", "AG1_HTTP__TOKEN", "AG1_CONFIG", "AG1_HTTP__LISTEN"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    if token is not None:
        env["AG1_CONTROL_TOKEN"] = token
    return subprocess.run(
        [python_exe, "-m", "supervisor.cli.main", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.strip() == text
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------------------- success


@pytest.mark.timeout(60)
def test_status_table_and_json(fake_server: Server, python_exe: str) -> None:
    """`status` prints agents, workers and groups as a table; `--json` prints /status."""
    url = fake_server()
    result = cli(python_exe, "status", "--url", url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "supervisor test-host  version 0.1.0" in out and "redis up" in out
    assert "AGENT" in out and "WORKER" in out and "STREAM" in out
    assert any(line.split()[:3] == ["echo", "running", "2/2"] for line in out.splitlines())
    worker_line = next(line for line in out.splitlines() if line.startswith("echo/0"))
    assert worker_line.split()[:6] == ["echo/0", "ready", "4000", "0", "1m00s", "47.7MiB"]
    group_line = next(line for line in out.splitlines() if line.startswith("AG1:agent:echo"))
    assert group_line.split() == ["AG1:agent:echo:inbox", "echo-group", "3", "unknown", "2"]

    result = cli(python_exe, "status", "--json", "--url", url)
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["agents"][0]["name"] == "echo"


@pytest.mark.timeout(60)
def test_control_commands_print_one_line(fake_server: Server, python_exe: str) -> None:
    """restart/scale/stop/start/reload print one line on success and exit 0."""
    url = fake_server()
    expected = {
        ("restart", "echo"): "restart of echo done",
        ("restart", "echo", "--rolling"): "rolling restart of echo done",
        ("scale", "echo", "3"): "scaled echo to 3 replicas",
        ("stop", "echo"): "stopped echo",
        ("start", "echo"): "started echo",
        ("reload",): "reloaded: no changes",
    }
    for argv, line in expected.items():
        result = cli(python_exe, *argv, "--url", url)
        assert (result.returncode, result.stdout, result.stderr) == (0, line + "\n", ""), argv


@pytest.mark.timeout(60)
def test_config_file_locates_the_server(
    fake_server: Server, python_exe: str, tmp_path: Path
) -> None:
    """-c reads [http] listen from fleet.toml, even when the rest of the file is invalid."""
    port = fake_server().rsplit(":", 1)[1]
    good = tmp_path / "fleet.toml"
    good.write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
    result = cli(python_exe, "reload", "-c", str(good))
    assert (result.returncode, result.stdout) == (0, "reloaded: no changes\n"), result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(
        f'[http]\nlisten = "127.0.0.1:{port}"\n[[agents]]\nname = "x"\nreplicas = -4\n'
    )
    result = cli(python_exe, "status", "-c", str(broken))
    assert result.returncode == 0, result.stderr
    # AG1_CONFIG is honoured as the default for -c (set by the parser in commands.py).
    env_result = subprocess.run(
        [python_exe, "-m", "supervisor.cli.main", "stop", "echo"],
        cwd=tmp_path,
        env={**os.environ, "AG1_CONFIG": str(good), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert env_result.stdout == "stopped echo\n", env_result.stderr


# ----------------------------------------------------------------------------- failures


@pytest.mark.timeout(60)
def test_supervisor_not_running(python_exe: str) -> None:
    """Nothing listening: one line naming the URL and 'connection refused', exit 1."""
    with socket.socket() as holder:  # bound, not listening: connects are refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        for argv in (("status",), ("restart", "echo", "--rolling"), ("reload",)):
            result = cli(python_exe, *argv, "--url", url)
            assert_one_line_failure(
                result,
                f"ag1-fleet {argv[0]}: cannot reach supervisor at {url}: connection refused",
            )


@pytest.mark.timeout(60)
def test_unknown_agent(fake_server: Server, python_exe: str) -> None:
    """An agent the supervisor does not know: one line, exit 1."""
    url = fake_server()
    result = cli(python_exe, "stop", "ghost", "--url", url)
    assert_one_line_failure(result, "ag1-fleet stop: unknown agent 'ghost'")


@pytest.mark.timeout(60)
def test_token_rules(fake_server: Server, python_exe: str) -> None:
    """Missing or wrong AG1_CONTROL_TOKEN: a clear unauthorized line; the right one works."""
    url = fake_server(token="tok-123")
    assert_one_line_failure(
        cli(python_exe, "reload", "--url", url),
        "ag1-fleet reload: unauthorized: the supervisor requires a token; set AG1_CONTROL_TOKEN",
    )
    assert_one_line_failure(
        cli(python_exe, "reload", "--url", url, token="nope"),
        "ag1-fleet reload: unauthorized: AG1_CONTROL_TOKEN does not match the supervisor's token",
    )
    ok = cli(python_exe, "reload", "--url", url, token="tok-123")
    assert (ok.returncode, ok.stdout) == (0, "reloaded: no changes\n")
    status = cli(python_exe, "status", "--url", url)  # GETs need no token
    assert status.returncode == 0


@pytest.mark.timeout(60)
def test_rejected_reload_and_conflict(fake_server: Server, python_exe: str) -> None:
    """A rejected reload and a busy agent each give one line and exit 1."""
    url = fake_server("--reject-reload")
    assert_one_line_failure(
        cli(python_exe, "reload", "--url", url),
        "ag1-fleet reload: reload rejected, the old plan keeps running: "
        "fleet.toml: agents[0].replicas: bad",
    )
    url = fake_server("--busy")
    assert_one_line_failure(
        cli(python_exe, "restart", "echo", "--rolling", "--url", url),
        "ag1-fleet restart: a rolling restart of echo is already running",
    )


@pytest.mark.timeout(60)
def test_usage_errors_exit_2(python_exe: str) -> None:
    """Bad arguments exit 2 without contacting anyone."""
    result = cli(python_exe, "scale", "echo", "-1", "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip() == "ag1-fleet scale: replicas must be >= 0"
    result = cli(python_exe, "scale", "echo")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_not_a_supervisor(python_exe: str) -> None:
    """A URL that answers something else (not JSON) is reported, not a traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [python_exe, "-m", "supervisor.cli.main", "status", "--url", url],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hi</html>")
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.strip() == (
        f"ag1-fleet status: {url} did not answer like an ag1-fleet supervisor: '<html>hi</html>'"
    )


# ----------------------------------------------------------------------------- units


def test_url_from_listen() -> None:
    """Wildcard binds are reached over loopback; IPv6 gets brackets; port 0 needs --url."""
    assert url_from_listen("127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert url_from_listen("0.0.0.0:9000") == "http://127.0.0.1:9000"
    assert url_from_listen("[::]:9000") == "http://[::1]:9000"
    assert url_from_listen("[::1]:9000") == "http://[::1]:9000"
    assert url_from_listen("localhost:1") == "http://localhost:1"
    with pytest.raises(ControlClientError, match="--url"):
        url_from_listen("127.0.0.1:0")


def test_resolve_base_url_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--url wins; a missing config file means the default 127.0.0.1:8765."""
    monkeypatch.delenv("AG1_HTTP__LISTEN", raising=False)
    assert resolve_base_url("whatever.toml", "http://h:1/") == "http://h:1"
    assert resolve_base_url(str(tmp_path / "none.toml"), None) == "http://127.0.0.1:8765"
    garbage = tmp_path / "garbage.toml"
    garbage.write_text("this is [not toml")
    with pytest.raises(ControlClientError, match="cannot find the control API address"):
        resolve_base_url(str(garbage), None)


def test_format_status_marks_unknowns() -> None:
    """Unknown lag shows '?', missing pid/RSS '-', a rejected reload is shown on top."""
    snap = snapshot(agent("echo", desired=2, ready=1, state="degraded"))
    snap.agents[0].workers[1].pid = None
    snap.agents[0].workers[1].rss_bytes = None
    snap.last_reload_error = "fleet.toml: agents[0].replicas: bad"
    text = format_status(snap.to_dict())
    assert "last reload rejected: fleet.toml: agents[0].replicas: bad" in text
    worker_line = next(line for line in text.splitlines() if line.startswith("echo/1"))
    assert worker_line.split()[1:3] == ["starting", "-"]
    assert "47.7MiB" not in worker_line


def test_format_status_shows_rolling_and_last_error() -> None:
    """A rolling restart marks the agent's state; an agent's last_error gets its own line."""
    snap = snapshot(agent("echo", desired=2, ready=2), agent("calc", desired=1, ready=0))
    snap.agents[0].rolling = True
    snap.agents[1].state = "fatal"
    snap.agents[1].last_error = "worker calc/0 exited 3 (fatal)"
    text = format_status(snap.to_dict())
    lines = text.splitlines()
    echo_line = next(line for line in lines if line.startswith("echo "))
    assert echo_line.split()[:4] == ["echo", "running", "(rolling)", "2/2"]
    calc_line = next(line for line in lines if line.startswith("calc "))
    assert "(rolling)" not in calc_line
    assert "calc: last error: worker calc/0 exited 3 (fatal)" in lines
    assert not any(line.startswith("echo: last error") for line in lines)

    snap.agents[0].rolling = False
    snap.agents[1].last_error = None
    quiet = format_status(snap.to_dict())
    assert "(rolling)" not in quiet and "last error" not in quiet


def test_reload_summary_names_sections_needing_a_restart() -> None:
    """`reload` appends the reply's restart_required sections; nothing when it is empty."""
    body = {"ok": True, "changed": ["echo"], "unchanged": ["calc"], "restart_required": []}
    assert reload_summary(body) == "changed echo; 1 unchanged"
    body["restart_required"] = ["redis", "http"]
    assert reload_summary(body) == "changed echo; 1 unchanged; restart needed for: redis, http"
    assert reload_summary({"restart_required": ["redis"]}) == (
        "no changes; restart needed for: redis"
    )


def test_client_timeout_outlasts_server_request_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a config, the client waits request_timeout + 10 s (at least 30 s) for an answer."""
    monkeypatch.delenv("AG1_HTTP__LISTEN", raising=False)
    monkeypatch.delenv("AG1_HTTP__REQUEST_TIMEOUT", raising=False)
    config = tmp_path / "fleet.toml"
    config.write_text('[http]\nlisten = "127.0.0.1:9999"\nrequest_timeout = "60s"\n')
    assert resolve_target(str(config), None) == ("http://127.0.0.1:9999", 70.0)
    config.write_text('[http]\nlisten = "127.0.0.1:9999"\n')
    assert resolve_target(str(config), None) == ("http://127.0.0.1:9999", 30.0)
    assert resolve_target(str(config), "http://x:1") == ("http://x:1", 30.0)
