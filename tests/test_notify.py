"""The supervisor's NOTIFY_SOCKET: sd_notify datagrams, sender pid by SO_PASSCRED, pgid match."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from supervisor.runtime.notify import NotifyMessage, NotifyServer, SenderIndex, parse_datagram
from supervisor.runtime.process import ChildProcess
from supervisor.runtime.sdnotify import Notifier

pytestmark = pytest.mark.anyio


def test_parse_datagram() -> None:
    """KEY=VALUE lines; values may contain '='; junk lines ignored."""
    fields = parse_datagram(b'READY=1\nSTATUS=a=b c\ngarbage\n=x\nX_AG1_STATS={"p":1}\n')
    assert fields == {"READY": "1", "STATUS": "a=b c", "X_AG1_STATS": '{"p":1}'}


async def _collect(server: NotifyServer, count: int, timeout: float = 10) -> list[NotifyMessage]:
    got: list[NotifyMessage] = []
    with anyio.fail_after(timeout):
        while len(got) < count:
            await anyio.wait_readable(server.sock)
            got.extend(server.receive_ready())
    return got


async def test_sender_pid_comes_from_the_kernel() -> None:
    """A datagram from this process carries our pid (SO_PASSCRED), parsed into fields."""
    with NotifyServer() as server:
        notifier = Notifier(server.address)
        assert notifier.send("READY=1", "STATUS=hi", "WATCHDOG=1", "X_AG1_STATS={}")
        notifier.close()
        (message,) = await _collect(server, 1)
    assert message.pid == os.getpid()
    assert message.ready and message.watchdog and message.status == "hi"
    assert message.stats == "{}"


async def test_child_message_resolves_to_its_worker(python_exe: str) -> None:
    """A worker child's READY=1 maps to the worker key registered for its pid."""
    with NotifyServer() as server:
        index = SenderIndex()
        env = dict(os.environ, NOTIFY_SOCKET=server.address)
        code = "from supervisor.runtime.sdnotify import sd_notify; sd_notify('READY=1')"
        async with ChildProcess.spawn([python_exe, "-c", code], env=env) as child:
            index.add(child.pid, "echo/0")
            (message,) = await _collect(server, 1)
            await child.wait()
    assert message.pid == child.pid
    assert index.resolve(message.pid) == "echo/0"


async def test_systemd_notify_from_a_shell_matches_by_process_group(tmp_path: Path) -> None:
    """`systemd-notify --ready` run by a worker's shell counts (its pgid is the worker's pid).

    systemd-notify sends its parent's pid (a nested shell here, so not the worker's
    pid) and BARRIER=1 with a pipe fd, waiting for us to close it; the server
    closes passed fds at once, so the tool returns quickly.
    """
    with NotifyServer() as server:
        index = SenderIndex()
        env = dict(os.environ, NOTIFY_SOCKET=server.address)
        script = "/bin/sh -c 'systemd-notify --ready --status=from-shell; echo done'; echo out"
        async with ChildProcess.spawn(["/bin/sh", "-c", script], env=env) as child:
            index.add(child.pid, "shell/0")
            messages: list[NotifyMessage] = []
            keys: list[str | None] = []
            with anyio.fail_after(10):
                while not any(m.ready for m in messages):
                    await anyio.wait_readable(server.sock)
                    batch = server.receive_ready()
                    messages.extend(batch)
                    keys.extend(index.resolve(m.pid) for m in batch)
            started = time.monotonic()
            with anyio.fail_after(10):
                while child.poll() is None:  # keep serving so the barrier is released
                    with anyio.move_on_after(0.05):
                        await anyio.wait_readable(server.sock)
                    server.receive_ready()
            assert time.monotonic() - started < 3
        ready = next(m for m in messages if m.ready)
    assert ready.pid != child.pid  # the nested shell or systemd-notify itself
    assert keys[messages.index(ready)] == "shell/0"
    assert ready.status == "from-shell"


async def test_unknown_sender_does_not_resolve() -> None:
    """A pid that is neither a worker nor in a worker's process group maps to nothing."""
    index = SenderIndex()
    index.add(999_999_999, "ghost/0")
    assert index.resolve(os.getpid()) is None
    assert index.resolve(None) is None


def test_socket_file_is_removed_on_close() -> None:
    """Closing the server removes the socket file and its private directory."""
    server = NotifyServer()
    path = Path(server.address)
    assert path.exists()
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    server.close()
    assert not path.exists() and not path.parent.exists()


def test_systemd_notify_tool_is_available() -> None:
    """The shell-agent test above relies on systemd-notify being installed."""
    result = subprocess.run(["systemd-notify", "--version"], capture_output=True, check=False)
    assert result.returncode == 0


BARRIER_SENDER = """
import array, os, socket, subprocess, sys

if sys.argv[1:] == ["child"]:
    # Like systemd-notify: send with a BARRIER fd, exit as soon as it is released.
    r, w = os.pipe()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))]
    s.sendmsg([b"READY=1\\nBARRIER=1"], fds, 0, os.environ["NOTIFY_SOCKET"])
    os.close(w)
    os.read(r, 1)  # EOF once the server closed its copy
else:
    subprocess.run([sys.executable, __file__, "child"], check=True)
"""


async def test_short_lived_sender_resolves_by_the_pgid_recorded_on_receipt(
    tmp_path: Path, python_exe: str
) -> None:
    """A sender in a worker's process group that exits the moment its BARRIER fd is
    closed still resolves to the worker: its pgid is taken before the fd is released."""
    script = tmp_path / "sender.py"
    script.write_text(BARRIER_SENDER)
    with NotifyServer() as server:
        index = SenderIndex()
        env = dict(os.environ, NOTIFY_SOCKET=server.address)
        async with ChildProcess.spawn([python_exe, str(script)], env=env) as child:
            index.add(child.pid, "shell/0")
            (message,) = await _collect(server, 1)
            with anyio.fail_after(10):
                status = await child.wait()  # the sender (its child) is gone too
        assert status.code == 0
    assert message.ready and message.pid != child.pid
    assert message.pgid == child.pid
    assert index.resolve_message(message) == "shell/0"
    assert index.resolve(message.pid) is None  # a lookup now, after exit, finds nothing
