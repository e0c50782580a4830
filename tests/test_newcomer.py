"""Everyday use as a newcomer meets it (issue 12): each defect driven as a subprocess.

``ag1-bus`` says which Redis it uses and destructive commands refuse the
implicit default; publish warns about streams nobody reads; ``tail --full``;
orphan groups listed and removed; ``ag1-fleet`` help, the missing-fleet.toml
hint, a port in use detected before the embedded Redis; the CLIs start without
importing what they do not need.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.orphans import record_groups
from tests.fleet_harness import FleetProcess

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    """The environment without Redis settings (as in a fresh shell), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "AG1_", "BUS_")) and k != "NOTIFY_SOCKET"
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _module(
    module: str, args: tuple[str, ...], cwd: Path, env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` as a user's shell would run it (no Redis settings)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env if env is not None else _env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def bus(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return _module("core_bus.tools.cli", args, cwd, env)


def fleet_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return _module("supervisor.cli.main", args, cwd, env)


# ----------------------------------------------------------------------------- 1: which Redis


def test_destructive_bus_commands_refuse_the_implicit_default(tmp_path: Path) -> None:
    """No --redis-url, no REDIS_URL, no ./.ag1/redis.url: purge/replay/destroy refuse
    (exit 2, nothing touched) and every command names the Redis it would use."""
    for argv in (
        ["dlq", "purge", "echo", "--yes"],
        ["dlq", "replay", "echo", "--all"],
        ["groups", "AG1:agent:echo:inbox", "--destroy", "echo"],
    ):
        proc = bus(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert "redis://127.0.0.1:6379/0 (default: no --redis-url" in lines[0], lines
        assert lines[-1].startswith("ag1-bus: refusing to "), lines
        assert "REDIS_URL" in lines[-1]


def test_bus_says_where_its_redis_came_from(redis_url: str, tmp_path: Path) -> None:
    """Flag, $REDIS_URL and ./.ag1/redis.url are each named on stderr; -q silences it;
    a password (also of a unix-socket URL) is never printed."""
    from_env = bus("groups", "AG1:none", cwd=tmp_path, env=_env(REDIS_URL=redis_url))
    assert f"ag1-bus: Redis {redis_url} (from $REDIS_URL)" in from_env.stderr
    state = tmp_path / ".ag1"
    state.mkdir()
    (state / "redis.url").write_text(redis_url + "\n")
    local = bus("groups", "AG1:none", cwd=tmp_path)
    assert f"Redis {redis_url} (from ./.ag1/redis.url" in local.stderr
    assert bus("-q", "groups", "AG1:none", cwd=tmp_path).stderr.startswith("ag1-bus: no such")
    secret = bus(
        "--redis-url", "unix://:s3cret-pw@/nonexistent/redis.sock", "groups", "X", cwd=tmp_path
    )
    assert secret.returncode == 1
    assert "unix://:***@/nonexistent/redis.sock (from --redis-url)" in secret.stderr
    assert "s3cret-pw" not in secret.stderr + secret.stdout
    query = bus("--redis-url", "unix:///none.sock?password=pw2x", "groups", "X", cwd=tmp_path)
    assert "pw2x" not in query.stderr and "password=***" in query.stderr


def test_redact_url_covers_unix_sockets_and_query_passwords() -> None:
    """The state dir's redis.url may be a unix socket with a password (either form)."""
    from core_bus.settings import redact_url

    assert redact_url("unix://:pw@/run/ag1/redis.sock") == "unix://:***@/run/ag1/redis.sock"
    assert (
        redact_url("unix:///run/ag1/redis.sock?db=0&password=pw")
        == "unix:///run/ag1/redis.sock?db=0&password=***"
    )
    assert redact_url("unix:///run/ag1/redis.sock") == "unix:///run/ag1/redis.sock"
    assert redact_url("redis://u:pw@[::1]:6390/0") == "redis://u:***@[::1]:6390/0"


# ----------------------------------------------------------------------------- 7: publish warns


async def test_publish_warns_about_streams_nobody_reads(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    """A stray key outside the namespace, or a stream without a consumer group, is
    published to (exit 0) with a warning each; a read stream gets none; -q silences."""
    env = _env(REDIS_URL=redis_url)
    stray = bus("publish", "echo", "--text", "hi", cwd=tmp_path, env=env)
    assert stray.returncode == 0, stray.stderr
    assert "warning: echo is outside the namespace 'AG1'" in stray.stderr
    assert "warning: no consumer group reads echo" in stray.stderr
    inbox = "AG1:agent:nc:inbox"
    unread = bus("publish", inbox, "--text", "hi", cwd=tmp_path, env=env)
    assert "no consumer group reads" in unread.stderr and "outside" not in unread.stderr
    await redis.xgroup_create(inbox, "nc", id="0")
    read = bus("publish", inbox, "--text", "hi", cwd=tmp_path, env=env)
    assert read.returncode == 0 and "warning" not in read.stderr
    quiet = bus("-q", "publish", "echo", "--text", "hi", cwd=tmp_path, env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert int(await redis.xlen("echo")) == 2


# ----------------------------------------------------------------------------- 9: tail --full


async def test_tail_full_shows_the_whole_content(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    env = _env(REDIS_URL=redis_url)
    text = "word " * 200
    assert bus("-q", "publish", "AG1:t:full", "--text", text, cwd=tmp_path, env=env).returncode == 0
    cut = bus("-q", "tail", "AG1:t:full", "--count", "1", cwd=tmp_path, env=env)
    assert "…" in cut.stdout and text.strip() not in cut.stdout
    whole = bus("-q", "tail", "AG1:t:full", "--count", "1", "--full", cwd=tmp_path, env=env)
    assert whole.returncode == 0 and text.strip() in whole.stdout


# ----------------------------------------------------------------------------- 9: orphan groups


async def test_orphan_groups_listed_and_removed(redis: Any, redis_url: str, tmp_path: Path) -> None:
    """`ag1-bus groups` lists every group of the namespace and marks the ones no
    supervisor records; --destroy removes an orphan, refuses a fleet's group and one
    with pending entries (unless --force)."""
    keys = StreamKeyBuilder("NC")
    live, gone = keys.agent_inbox("live"), keys.agent_inbox("gone")
    for stream, group in ((live, "live"), (gone, "gone")):
        await redis.xadd(stream, {"data": "{}"})
        await redis.xgroup_create(stream, group, id="0")
    await record_groups(redis, keys, "sup1", {"live": "live"})
    env = _env(REDIS_URL=redis_url, BUS_NAMESPACE="NC")

    listing = bus("-q", "groups", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[1]: line for line in listing.stdout.splitlines()[1:] if "inbox" in line}
    assert rows["live"].endswith("sup1/live") and rows["gone"].endswith("ORPHAN")
    assert f"ag1-bus groups {gone} --destroy gone" in listing.stdout

    refused = bus("-q", "groups", live, "--destroy", "live", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "read by sup1/live" in refused.stderr
    await redis.xreadgroup("gone", "c1", {gone: ">"})  # one pending entry
    pending = bus("-q", "groups", gone, "--destroy", "gone", cwd=tmp_path, env=env)
    assert pending.returncode == 1 and "1 pending entries" in pending.stderr
    forced = bus("-q", "groups", gone, "--destroy", "gone", "--force", cwd=tmp_path, env=env)
    assert forced.returncode == 0, forced.stderr
    assert [g["name"] for g in await redis.xinfo_groups(gone)] == []
    assert len(await redis.xinfo_groups(live)) == 1


async def test_groups_counts_the_lag_redis_does_not_give(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    """After an XDEL behind the group's position Redis reports lag NULL: the entries
    after the last-delivered id are counted instead, and the table says why."""
    stream = "AG1:agent:lagged:inbox"
    ids = [await redis.xadd(stream, {"data": "{}"}) for _ in range(6)]
    await redis.xgroup_create(stream, "lagged", id="0")
    await redis.xreadgroup("lagged", "c1", {stream: ">"}, count=1)
    await redis.xdel(stream, ids[3])  # after last-delivered: XINFO lag becomes NULL
    raw = await redis.xinfo_groups(stream)
    if raw[0].get("lag", "absent") is not None and "lag" in raw[0]:
        pytest.skip("this Redis computes the lag even here")
    proc = bus("-q", "groups", stream, cwd=tmp_path, env=_env(REDIS_URL=redis_url))
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("lagged"))
    assert row.split()[3] == "4*"  # 5 left after the delivered one, one of them deleted
    assert "counted the entries after" in proc.stdout


# ----------------------------------------------------------------------------- 8: help, hints


def test_help_teaches(tmp_path: Path) -> None:
    """`ag1-fleet --help` has examples; every command has a description and examples;
    every positional and option of both CLIs has a help text."""
    top = fleet_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "examples:" in top.stdout
    assert "ag1-fleet run -c fleet.example.toml" in top.stdout
    for command in ("run", "check", "status", "restart", "scale", "stop", "start", "reload"):
        text = fleet_cli(command, "--help", cwd=tmp_path).stdout
        body = text.split("\n\n", 2)
        assert len(body) >= 3 and not body[1].startswith(("positional", "options")), command
        assert "examples:" in text, command

    import argparse

    from core_bus.tools.cli import build_parser as bus_parser
    from supervisor.cli.commands import build_parser as fleet_parser

    def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += undocumented(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert undocumented(fleet_parser(), "ag1-fleet") == []
    assert undocumented(bus_parser(), "ag1-bus") == []


def test_missing_fleet_toml_hints_at_the_example(tmp_path: Path) -> None:
    (tmp_path / "fleet.example.toml").write_text((ROOT / "fleet.example.toml").read_text())
    proc = fleet_cli("check", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fleet.toml: file not found (try: -c fleet.example.toml, or copy it to fleet.toml)"
    )
    run = fleet_cli("run", cwd=tmp_path)
    assert run.returncode == 2 and "try: -c fleet.example.toml" in run.stderr
    elsewhere = fleet_cli("check", cwd=tmp_path / "..")
    assert "pass the file with -c PATH" in elsewhere.stderr


@pytest.mark.timeout(60)
def test_port_in_use_is_refused_before_the_embedded_redis(tmp_path: Path) -> None:
    """The port is taken: `ag1-fleet run` exits 1 at once, suggests AG1_HTTP__LISTEN,
    and never started the embedded redis-server (no state dir, no redis.url)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        toml = f"""
            [supervisor]
            name = "nc"
            state_dir = "{tmp_path / "state"}"
            [redis]
            url = "embedded"
            [http]
            listen = "127.0.0.1:{port}"
            [[agents]]
            name = "x"
            command = ["sleep", "60"]
        """
        fleet = FleetProcess(tmp_path, toml)
        try:
            assert fleet.proc.wait(30) == 1
        finally:
            fleet.close()
    [event] = fleet.events("supervisor cannot run")
    assert "Address already in use" in event["error"]
    assert f"AG1_HTTP__LISTEN=127.0.0.1:{port + 1}" in event["error"]
    assert not (tmp_path / "state" / "redis.url").exists()
    assert not (tmp_path / "state" / "redis").exists()
    assert "redis-server" not in fleet.log_path.read_text()


# ----------------------------------------------------------------------------- 9: install, speed


def test_running_the_fleet_installs_no_test_tools() -> None:
    """The README's run command installs the runtime only; its test command adds pytest;
    ruff and mypy are neither runtime nor test dependencies (the dev extra)."""
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1]
    run_line, test_line = [
        line for line in quickstart.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
        if line.strip()
    ]
    assert "pip install -e . &&" in run_line and "[" not in run_line.split("&&")[1]
    assert "pip install -e '.[test]'" in test_line
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    test = " ".join(project["optional-dependencies"]["test"])
    for tool in ("pytest", "ruff", "mypy"):
        assert tool not in runtime
    assert "pytest" in test and "ruff" not in test and "mypy" not in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_line in ci.splitlines() and "'.[dev]'" in ci


def _imported(*argv: str, cwd: Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=60,
        check=False,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_http_only_cli_does_not_import_the_bus(tmp_path: Path) -> None:
    """`ag1-fleet status -c fleet.toml` talks HTTP: no redis, pydantic, anyio or core_bus
    (they were ~0.4 s of its 0.6 s); `ag1-bus --help` imports no redis client."""
    (tmp_path / "fleet.toml").write_text((ROOT / "fleet.example.toml").read_text())
    status = _imported("-m", "supervisor.cli.main", "status", "-c", "fleet.toml", cwd=tmp_path)
    assert "supervisor.cli.client" in status
    heavy = {"redis", "pydantic", "pydantic_settings", "anyio", "core_bus", "aiohttp"}
    assert heavy & status == set()
    help_imports = _imported("-m", "core_bus.tools.cli", "--help", cwd=tmp_path)
    assert "core_bus.tools" in help_imports
    assert {"redis", "pydantic", "anyio"} & help_imports == set()
