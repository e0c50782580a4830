"""The private notify directory lives under the state dir, and a SIGKILLed supervisor's
leftovers (there, or in /tmp from older versions) are removed by the next start."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from supervisor.runtime.notify import TMP_PREFIX, NotifyServer
from tests.fleet_harness import FleetProcess, agent_toml, cmd, run_toml
from tests.waiting import eventually_sync

pytestmark = pytest.mark.timeout(90)

SLEEP = "import time; time.sleep(60)"


def _dead_socket_dir(parent: Path, name: str) -> Path:
    """A directory with a notify.sock nobody receives on (what SIGKILL leaves)."""
    directory = parent / name
    directory.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify.sock"))
    sock.close()
    return directory


def test_sigkilled_supervisors_notify_dir_is_cleaned_by_the_next_start(
    tmp_path: Path, redis_url: str, python_exe: str
) -> None:
    state = tmp_path / "state"
    toml = run_toml(
        agent_toml("sleepy", cmd(python_exe, SLEEP)),
        name="notifydir",
        url=redis_url,
        state_dir=str(state),
        stop_timeout="5s",
    )
    legacy = _dead_socket_dir(Path(tempfile.gettempdir()), f"{TMP_PREFIX}legacy{os.getpid()}")
    before = set(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"))
    (tmp_path / "one").mkdir()
    first = FleetProcess(tmp_path / "one", toml)
    try:
        first.wait_event("supervisor started", timeout=30)
        (started,) = first.find("supervisor started")
        notify = Path(started["notify_socket"])
        assert notify.parent.parent == state / "run"
        assert notify.parent.name.startswith(f"notify-{first.proc.pid}-")
        assert notify.parent.stat().st_mode & 0o777 == 0o700
        assert not legacy.exists()  # a dead supervisor's /tmp leftover went at start
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.close()
    assert notify.exists()  # SIGKILL leaves it: nothing could run on the way out
    assert set(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*")) <= before - {legacy}

    (tmp_path / "two").mkdir()
    second = FleetProcess(tmp_path / "two", toml, graceful=True)
    try:
        second.wait_event("supervisor started", timeout=30)
        eventually_sync(lambda: not notify.parent.exists(), timeout=5, message="stale dir gone")
        (started,) = second.find("supervisor started")
        assert Path(started["notify_socket"]).exists()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
    finally:
        second.close()
    assert not list((state / "run").iterdir())  # a clean stop removes its own


def test_a_live_supervisors_directory_is_left_alone(tmp_path: Path) -> None:
    with NotifyServer(state_dir=tmp_path) as live:
        dead = _dead_socket_dir(tmp_path / "run", "notify-999999999")
        with NotifyServer(state_dir=tmp_path) as other:
            assert live.path.exists() and other.path.exists()
            assert not dead.exists()
        assert live.path.exists()
