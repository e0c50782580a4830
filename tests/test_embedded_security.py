"""The embedded server is no file writer for local users, and never opens another's data.

The attack from the issue: an unprivileged local user connects to the embedded
server and runs ``CONFIG SET dir`` / ``dbfilename`` + ``SAVE`` to drop a
root-owned file into a root-only directory. It runs here as user ``nobody`` in a
subprocess with dropped privileges, over the unix socket, over TCP without the
password, and over TCP *with* the password (as if it had leaked to a worker).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import textwrap
from functools import partial
from pathlib import Path

import anyio
import pytest
import redis.asyncio as redis_asyncio

from supervisor.redis.embedded import EmbeddedRedisError, run_embedded_redis
from supervisor.redis.hardening import DENIED_COMMANDS
from supervisor.redis.layout import RECORD_FILE
from supervisor.redis.server import RedisServerError, find_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

ATTACK = textwrap.dedent(
    r"""
    import json, os, socket, sys

    def resp(*args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        return out

    def talk(sock, *commands):
        replies, reader = [], sock.makefile("rb")
        for command in commands:
            try:
                sock.sendall(resp(*command))
                line = reader.readline()
            except OSError as exc:
                line = b"closed: " + str(exc).encode()
            replies.append(line.decode("utf-8", "replace").strip() or "closed")
        return replies

    target_dir, unix_path, port, password = sys.argv[1:5]
    attack = [
        ("CONFIG", "SET", "dir", target_dir),
        ("CONFIG", "SET", "dbfilename", "pwned"),
        ("SAVE",),
        ("BGSAVE",),
        ("DEBUG", "SLEEP", "0"),
        ("MODULE", "LIST"),
        ("REPLICAOF", "127.0.0.1", "1"),
        ("ACL", "SETUSER", "default", "+@all"),
        ("SHUTDOWN", "NOSAVE"),
    ]
    result = {"uid": os.getuid()}
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(unix_path)
        result["unix"] = talk(s, *attack)
    except OSError as exc:
        result["unix"] = "refused: %s" % exc.strerror
    s = socket.create_connection(("127.0.0.1", int(port)))
    result["tcp_no_password"] = talk(s, *attack)
    s = socket.create_connection(("127.0.0.1", int(port)))
    result["tcp_with_password"] = talk(s, ("AUTH", password), *attack)
    print(json.dumps(result))
    """
)


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges to 'nobody' needs root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


def _interpreter_for(user: pwd.struct_passwd, preferred: str) -> str:
    """A Python 3 the user may execute (the attack script needs only the stdlib)."""
    for candidate in (preferred, shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")):
        if candidate is not None and _can_exec(candidate, user):
            return candidate
    pytest.skip("no Python interpreter that 'nobody' may execute")


def _can_exec(path: str, user: pwd.struct_passwd) -> bool:
    try:
        subprocess.run(
            [path, "-I", "-c", "pass"],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            check=True,
            cwd="/",
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.parametrize("which", ["system", "bundled"])
async def test_config_set_dir_and_save_as_nobody_cannot_write_a_file(
    tmp_path: Path, python_exe: str, which: str
) -> None:
    nobody = _nobody()
    python = _interpreter_for(nobody, python_exe)
    try:
        binary, _ = find_redis_server(choice=which)
    except RedisServerError as exc:
        pytest.skip(str(exc))
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    state = tmp_path / "state"
    with socket_port() as port:
        pass
    async with anyio.create_task_group() as tg:
        await tg.start(partial(run_embedded_redis, state, port, binary=binary))
        password = (state / "redis.password").read_text().strip()
        result = await anyio.to_thread.run_sync(
            partial(
                subprocess.run,
                [
                    python,
                    "-I",
                    "-c",
                    ATTACK,
                    str(target),
                    str(state / "redis.sock"),
                    str(port),
                    password,
                ],
                user=nobody.pw_uid,
                group=nobody.pw_gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
            )
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        client = redis_asyncio.Redis.from_url(await _url(state))
        try:
            assert await client.ping()  # SHUTDOWN did nothing either
            role = await client.execute_command("ROLE")
            assert role[0] in (b"master", "master")  # REPLICAOF did nothing
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()
    assert answer["uid"] == nobody.pw_uid
    assert answer["unix"].startswith("refused"), answer["unix"]
    # Every command is refused: NOAUTH, or DEBUG switched off altogether.
    assert all(r.startswith(("-NOAUTH", "-ERR DEBUG")) for r in answer["tcp_no_password"]), answer
    authed = answer["tcp_with_password"]
    assert authed[0] == "+OK"
    assert all(reply.startswith("-") for reply in authed[1:]), authed  # refused, each one
    assert all(reply.startswith("-NOPERM") for reply in authed[1:5]), authed  # CONFIG, SAVEs
    assert list(target.iterdir()) == []
    assert not (state / "redis" / "pwned").exists()


async def _url(state: Path) -> str:
    return (state / "redis.url").read_text().strip()


class socket_port:
    """A loopback port that was free a moment ago."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def test_every_command_of_the_attack_is_denied() -> None:
    for name in ("config", "debug", "module", "save", "replicaof", "slaveof", "shutdown", "acl"):
        assert name in DENIED_COMMANDS


async def test_switching_to_a_server_that_cannot_read_the_data_is_refused(
    tmp_path: Path,
) -> None:
    """Valkey 9 data opened by Redis 7.0: one line saying what to do; the data stays."""
    try:
        valkey, _ = find_redis_server(choice="bundled")
        redis7, version = find_redis_server(choice="system")
    except RedisServerError as exc:
        pytest.skip(str(exc))
    if version >= (7, 2, 0):
        pytest.skip("needs a system Redis older than the bundled Valkey")
    async with anyio.create_task_group() as tg:
        url = await tg.start(partial(run_embedded_redis, tmp_path, binary=valkey))
        client = redis_asyncio.Redis.from_url(url)
        await client.xadd("AG1:agent:echo:inbox", {"data": b"kept"})
        await client.aclose()
        tg.cancel_scope.cancel()
    record = json.loads((tmp_path / "redis" / RECORD_FILE).read_text())
    assert record["family"] == "valkey" and record["aof"] == "appendonlydir"

    with pytest.raises(EmbeddedRedisError) as refused:
        await run_embedded_redis(tmp_path, binary=redis7)
    message = str(refused.value)
    assert "\n" not in message
    assert "written by Valkey 9" in message and "AG1_REDIS_SERVER" in message
    assert "move" in message and str(tmp_path / "redis") in message

    async with anyio.create_task_group() as tg:
        url = await tg.start(partial(run_embedded_redis, tmp_path, binary=valkey))
        client = redis_asyncio.Redis.from_url(url)
        try:
            assert await client.xlen("AG1:agent:echo:inbox") == 1
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()


async def test_redis_7_data_is_carried_over_to_the_bundled_valkey(tmp_path: Path) -> None:
    """The other way is safe (Valkey reads Redis 7.0's files): data kept, record updated."""
    try:
        valkey, _ = find_redis_server(choice="bundled")
        redis7, _ = find_redis_server(choice="system")
    except RedisServerError as exc:
        pytest.skip(str(exc))
    for binary in (redis7, valkey):
        async with anyio.create_task_group() as tg:
            url = await tg.start(partial(run_embedded_redis, tmp_path, binary=binary))
            client = redis_asyncio.Redis.from_url(url)
            try:
                await client.incr("runs")
                runs = int(await client.get("runs"))
            finally:
                await client.aclose()
            tg.cancel_scope.cancel()
    assert runs == 2
    record = json.loads((tmp_path / "redis" / RECORD_FILE).read_text())
    assert record["family"] == "valkey"
