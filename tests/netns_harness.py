"""Real hosts for tests: Linux network namespaces joined by veth pairs (iproute2).

:class:`NetnsLab` builds one namespace for Redis (holding a bridge, the lab's
"switch", at ``10.231.N.1/24``) and one per host (``eth0`` at ``10.231.N.(10+i)``,
``lo`` up), each host joined to the bridge by a veth pair whose switch end
stays in the Redis namespace. Redis (``find_redis_server()``) runs inside the
Redis namespace, bound to the bridge address; it also listens on a unix socket
in the lab's directory, which is how the test process (in the root namespace,
untouched) reaches it. A supervisor (``ag1-fleet run`` through ``ip netns
exec``) runs in each host namespace with its own state dir and fleet.toml;
its control API is on the host's own loopback, reached with :meth:`cli`.

Faults: :meth:`cut` sets a host's switch-side veth down (the host keeps its
address but no packet passes: a real partition, no RST), :meth:`heal` brings
it up, :meth:`kill_host` SIGKILLs every process in the host's namespace (its
whole process tree, workers included).

Names are unique per run (``ag1t<pid>x<seq>``); :meth:`close` kills every
process in the lab's namespaces and deletes them (which removes their veths),
also from an ``atexit`` hook, and namespaces left by a dead test process are
removed when the next lab is built. :func:`netns_unavailable` says why a lab
cannot be built here (not root, no ``ip``, no namespaces), for a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.redis.server import find_redis_server

PREFIX = "ag1t"
#: Inside the Redis host's own namespace (its own network stack); still not Redis's
#: default port, so no reader mistakes it for the machine's shared server.
REDIS_PORT = 16379
HTTP_PORT = 8765
_labs: list[NetnsLab] = []
_seq = 0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if bridge.returncode != 0:
            return f"no bridge support in namespaces: {bridge.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_labs() -> list[str]:
    """Delete namespaces of labs whose test process is gone (a SIGKILLed pytest)."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)x\d+-\w+", name)
        if match and not _alive(int(match.group(1))):
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_netns_pids(ns: str) -> list[int]:
    pids = _netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@dataclass
class NetnsHost:
    """One test host: a namespace with an address on the lab's bridge."""

    name: str  # also its [supervisor] name
    ns: str
    switch_veth: str  # the veth end in the Redis namespace (cut/heal act on it)
    address: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: Any = None
    runs: int = 0

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """JSON log lines of the supervisor's current run (event ``name`` only, if given)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and name in (None, event.get("event")):
                out.append(event)
        return out

    def tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class NetnsLab:
    """Redis in one namespace, ``hosts`` host namespaces on a bridge (see module docstring)."""

    base_dir: Path
    hosts: int = 2
    tag: str = ""
    subnet: int = 0
    redis_ns: str = ""
    redis_address: str = ""
    redis_socket: Path = field(default_factory=Path)
    members: dict[str, NetnsHost] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)
    _redis: subprocess.Popen[bytes] | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        global _seq
        _seq += 1
        self.tag = f"{PREFIX}{os.getpid()}x{_seq}"
        self.subnet = 1 + (os.getpid() + _seq) % 250
        self.redis_ns = f"{self.tag}-redis"
        self.redis_address = f"10.231.{self.subnet}.1"
        self.redis_socket = self.base_dir / "redis.sock"

    # -- building ------------------------------------------------------------------
    def build(self) -> NetnsLab:
        """Create namespaces, bridge, veths and Redis; on any failure clean up and raise."""
        _labs.append(self)
        try:
            remove_stale_labs()
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._add_ns(self.redis_ns)
            _ip("-n", self.redis_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.redis_ns, "addr", "add", f"{self.redis_address}/24", "dev", "br0")
            _ip("-n", self.redis_ns, "link", "set", "br0", "up")
            for i in range(1, self.hosts + 1):
                self._add_host(i)
            self._start_redis()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_host(self, i: int) -> None:
        name = f"h{i}"
        ns = f"{self.tag}-{name}"
        self._add_ns(ns)
        short = f"a{os.getpid()}{_seq}{name}"  # <= 15 characters with the s/n suffix
        switch_end, host_end = f"{short}s", f"{short}n"
        # Both ends are created directly inside their namespaces: nothing in the root one.
        _ip(
            "link", "add", switch_end, "netns", self.redis_ns, "type", "veth",
            "peer", "name", host_end, "netns", ns,
        )  # fmt: skip
        _ip("-n", self.redis_ns, "link", "set", switch_end, "master", "br0")
        _ip("-n", self.redis_ns, "link", "set", switch_end, "up")
        _ip("-n", ns, "link", "set", host_end, "name", "eth0")
        address = f"10.231.{self.subnet}.{10 + i}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host_dir = self.base_dir / name
        host_dir.mkdir(parents=True, exist_ok=True)
        self.members[name] = NetnsHost(name, ns, switch_end, address, host_dir)

    def _start_redis(self) -> None:
        binary, _version = find_redis_server()
        data = self.base_dir / "redis"
        data.mkdir(exist_ok=True)
        self._redis = subprocess.Popen(
            [
                "ip", "netns", "exec", self.redis_ns, str(binary),
                "--bind", self.redis_address, "--port", str(REDIS_PORT),
                "--unixsocket", str(self.redis_socket), "--unixsocketperm", "700",
                "--protected-mode", "no", "--save", "", "--appendonly", "no",
                "--dir", str(data), "--daemonize", "no", "--logfile", str(data / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._redis_pings():
            if self._redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start in {self.redis_ns}")
            time.sleep(0.02)

    def _redis_pings(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.redis_socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def redis_url(self) -> str:
        """The URL supervisors use: TCP over the lab's network."""
        return f"redis://{self.redis_address}:{REDIS_PORT}/0"

    @property
    def local_url(self) -> str:
        """The URL the test process uses: the unix socket (no network path to cut)."""
        return f"unix://{self.redis_socket}"

    # -- supervisors ---------------------------------------------------------------
    def start_supervisor(self, host: NetnsHost, toml: str) -> None:
        """``ag1-fleet run`` inside ``host``'s namespace, in its own session, JSON log."""
        if host.proc is not None and host.proc.poll() is None:
            raise RuntimeError(f"{host.name}: a supervisor is already running")
        host.runs += 1
        config = host.dir / "fleet.toml"
        config.write_text(textwrap.dedent(toml))
        if host._log is not None:
            host._log.close()
        host.log_path = host.dir / f"run-{host.runs}.log"
        host._log = host.log_path.open("wb")
        env = dict(os.environ, AG1_LOG_FORMAT="json", AG1_LOG_LEVEL="INFO")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "AG1_CONTROL_TOKEN"):
            env.pop(name, None)
        host.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, sys.executable, "-m", "supervisor.cli.main",
             "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=host._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(host.dir),
            start_new_session=True,
        )  # fmt: skip

    def cli(
        self, host: NetnsHost, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """``ag1-fleet ARGS --url http://127.0.0.1:8765`` run inside ``host``'s namespace."""
        env = {k: v for k, v in os.environ.items() if k != "AG1_CONTROL_TOKEN"}
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, sys.executable, "-m", "supervisor.cli.main",
             *args, "--url", f"http://127.0.0.1:{HTTP_PORT}"],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=str(host.dir),
        )  # fmt: skip

    def cli_json(self, host: NetnsHost, *args: str, timeout: float = 30) -> dict[str, Any]:
        done = self.cli(host, *args, "--json", timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"ag1-fleet {' '.join(args)} exited {done.returncode}: "
                                 f"{done.stderr.strip()} {done.stdout[-500:]}")  # fmt: skip
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    # -- faults ----------------------------------------------------------------------
    def cut(self, host: NetnsHost) -> None:
        """Partition ``host``: its switch-side veth goes down; no packet passes."""
        _ip("-n", self.redis_ns, "link", "set", host.switch_veth, "down")

    def heal(self, host: NetnsHost) -> None:
        _ip("-n", self.redis_ns, "link", "set", host.switch_veth, "up")

    def kill_host(self, host: NetnsHost, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process in the host's namespace (supervisor and workers at once);
        returns once none is left (killed children are reaped by init, not at once)."""
        pids = _kill_netns_pids(host.ns)
        if host.proc is not None:
            host.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while _kill_netns_pids(host.ns):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}: processes left after SIGKILL")
            time.sleep(0.01)
        return pids

    def host_pids(self, host: NetnsHost) -> list[int]:
        return _netns_pids(host.ns)

    # -- cleanup ---------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process of the lab, delete its namespaces (and with them its veths)."""
        if self._closed:
            return
        self._closed = True
        for host in self.members.values():
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)  # a graceful stop first: it leaves
        for host in self.members.values():
            if host.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.proc.wait(10)
        for ns in self._namespaces:
            _kill_netns_pids(ns)
        for host in self.members.values():
            if host.proc is not None and host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(10)
            if host._log is not None:
                host._log.close()
        if self._redis is not None and self._redis.poll() is None:
            self._redis.kill()
            self._redis.wait(10)
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        if self in _labs:
            _labs.remove(self)

    def leftovers(self) -> list[str]:
        """Namespaces of this lab still present (empty after :meth:`close`)."""
        listing = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in listing.splitlines() if line.startswith(self.tag)]


@atexit.register
def _close_all() -> None:
    for lab in list(_labs):
        with contextlib.suppress(Exception):
            lab.close()
