"""The sd_notify conversation of `ag1-fleet run` with "systemd", played by a datagram socket.

The test owns a unix datagram socket, starts `ag1-fleet run` with
``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` pointing at it, and reads what arrives
together with the sender's pid (SO_PASSCRED), as systemd does with
``NotifyAccess=main``.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_http_e2e import RealFleet, header, sleeper
from tests.waiting import eventually_sync

WATCHDOG_USEC = 1_000_000  # the supervisor must ping every 0.5 s


@dataclass
class Datagram:
    pid: int
    fields: dict[str, str]
    at: float


class FakeSystemd:
    """Receives sd_notify datagrams on a thread; records sender pid and fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.received: list[Datagram] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, creds_size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.received.append(Datagram(pid, fields, time.monotonic()))

    def messages(self) -> list[Datagram]:
        with self._lock:
            return list(self.received)

    def index_of(self, key: str, value: str | None = None, after: int = -1) -> int | None:
        for i, d in enumerate(self.messages()):
            if i > after and key in d.fields and (value is None or d.fields[key] == value):
                return i
        return None

    def wait_for(
        self, key: str, value: str | None = None, after: int = -1, timeout: float = 30
    ) -> int:
        found = eventually_sync(
            lambda: self.index_of(key, value, after) is not None,
            timeout,
            interval=0.02,
            message=f"{key}={value or '*'} after #{after}",
        )
        assert found
        index = self.index_of(key, value, after)
        assert index is not None
        return index

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    server = FakeSystemd(tmp_path / "notify.sock")
    try:
        yield server
    finally:
        server.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.timeout(120)
def test_sd_notify_sequence(tmp_path: Path, redis_url: str, fake_systemd: FakeSystemd) -> None:
    """READY=1 only once workers are ready (with STATUS=), WATCHDOG=1 every WATCHDOG_USEC/2,
    RELOADING=1 + MONOTONIC_USEC on SIGHUP then READY=1, STOPPING=1 on SIGTERM; every
    datagram comes from the supervisor itself, never from a worker."""
    toml = header(redis_url) + sleeper("alpha", 2) + sleeper("beta")
    fleet = RealFleet(
        tmp_path,
        toml,
        env={"NOTIFY_SOCKET": str(fake_systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    try:
        url = fleet.wait_listening()
        ready = fake_systemd.wait_for("READY", "1")
        # READY=1 means the plan is up: every worker ready, so /readyz agrees at once.
        assert http_status(url + "/readyz") == 200
        first = fake_systemd.messages()[ready]
        assert first.fields.get("STATUS") == "3/3 workers ready in 2 agents"

        # WATCHDOG=1 keeps coming at about half the watchdog interval.
        def pings() -> list[Datagram]:
            return [d for d in fake_systemd.messages() if d.fields.get("WATCHDOG") == "1"]

        eventually_sync(lambda: len(pings()) >= 5, 20, message="5 watchdog pings")
        times = [d.at for d in pings()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # never late enough to be killed

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        seen = len(fake_systemd.messages()) - 1
        fleet.proc.send_signal(signal.SIGHUP)
        reloading = fake_systemd.wait_for("RELOADING", "1", after=seen)
        stamp = fake_systemd.messages()[reloading].fields.get("MONOTONIC_USEC", "")
        assert re.fullmatch(r"\d+", stamp), stamp
        # CLOCK_MONOTONIC is system-wide: the stamp is "now" as this process sees it.
        assert abs(int(stamp) - time.monotonic_ns() // 1000) < 30_000_000
        fake_systemd.wait_for("READY", "1", after=reloading)

        # SIGTERM: STOPPING=1, then a clean exit.
        seen = len(fake_systemd.messages()) - 1
        fleet.proc.send_signal(signal.SIGTERM)
        fake_systemd.wait_for("STOPPING", "1", after=seen)
        assert fleet.proc.wait(30) == 0
        senders = {d.pid for d in fake_systemd.messages()}
        assert senders == {fleet.proc.pid}, senders
    finally:
        fleet.close()


@pytest.mark.timeout(60)
def test_no_notify_socket_means_silence(tmp_path: Path, redis_url: str) -> None:
    """Without NOTIFY_SOCKET the supervisor runs normally (nothing to send, nothing fails)."""
    fleet = RealFleet(tmp_path, header(redis_url) + sleeper("solo"))
    try:
        url = fleet.wait_listening()
        eventually_sync(lambda: http_status(url + "/readyz") == 200, 30, interval=0.1)
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(30) == 0
    finally:
        fleet.close()
