"""The supervisor's private redis-server for ``[redis] url = "embedded"``.

One child process, owned by the caller's task group: AOF on, data under
``<state_dir>/redis``, loopback only, protected mode. Its URL is written to
``<state_dir>/redis.url`` so ``ag1-bus --state-dir`` and ``ag1-fleet status``
can find it, and its port to ``<state_dir>/redis.port`` so the next supervisor
run reuses the same URL. A crashed server is restarted with backoff on the same
port and data dir, so clients simply reconnect. Cancellation stops it with
SIGTERM (Redis flushes the AOF), SIGKILL after a timeout.

The binary lookup and command line come from :mod:`supervisor.redis.server`.
The process is spawned with :mod:`asyncio` subprocesses (the supervisor runs on
anyio's asyncio backend) because a parent-death signal needs ``preexec_fn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil

from core_bus.log import get_logger
from supervisor.redis.server import (
    RedisServerError,
    RedisServerProcess,
    check_redis_server,
    find_redis_server,
    pick_free_port,
    port_is_free,
)

URL_FILE = "redis.url"
PORT_FILE = "redis.port"
DATA_SUBDIR = "redis"
PID_FILE = "redis-server.pid"


def _log() -> Any:
    # Looked up per event (rare here): a module-level bound logger would freeze
    # the structlog configuration of import time.
    return get_logger("supervisor.redis.embedded")


_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)


class EmbeddedRedisError(RedisServerError):
    """The embedded redis-server could not be started (or restarted)."""


def url_file(state_dir: Path) -> Path:
    """Where the running embedded server's URL is written (removed when it stops)."""
    return Path(state_dir) / URL_FILE


def read_embedded_url(state_dir: Path) -> str | None:
    """The URL of the embedded server of a running supervisor, or None."""
    try:
        value = url_file(state_dir).read_text().strip()
    except OSError:
        return None
    return value or None


def _death_signal_setter(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when its parent dies (Linux only)."""
    libc = _libc
    if libc is None:
        return None

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _log_tail(data_dir: Path, lines: int = 3, width: int = 200) -> str:
    """The last lines of redis.log (each cut to ``width``), to say why it stopped."""
    try:
        with (data_dir / "redis.log").open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:width] for line in tail[-lines:])


async def _answers_ping(port: int) -> bool:
    """True once the server replies +PONG (not -LOADING while it replays the AOF)."""
    try:
        with anyio.fail_after(1.0):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"PING\r\n")
                reply = await stream.receive(64)
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False
    return reply.startswith(b"+PONG")


def _write_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


def _stale_server_pid(pid_file: Path) -> int | None:
    """Pid of a redis-server left by an earlier run that still uses our data dir."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if "redis" in proc.name() and proc.status() != psutil.STATUS_ZOMBIE:
            return pid
    except psutil.Error:
        pass
    return None


class EmbeddedRedis:
    """A supervised private redis-server; :meth:`run` owns it until cancelled.

    ``port=0`` reuses the port remembered in the state dir when it is free,
    otherwise picks a free one. Attributes ``url``, ``pid``, ``restarts`` and
    ``version`` describe the running server (for status pages and tests).
    """

    def __init__(
        self,
        state_dir: Path,
        port: int = 0,
        *,
        binary: Path | None = None,
        stop_timeout: float = 10.0,
        start_timeout: float = 30.0,
        max_failed_starts: int = 5,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        stable_after: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.data_dir = self.state_dir / DATA_SUBDIR
        self.port = port
        self.binary = binary
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.max_failed_starts = max_failed_starts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.restarts = 0
        self._fixed_port = port != 0
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the live server process (None between a crash and its restart)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None
        return proc.pid

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start, report the URL through ``task_status``, keep it up until cancelled.

        Raises :class:`RedisServerError` when no usable binary exists or it is
        older than 6.2, and :class:`EmbeddedRedisError` when it cannot start
        (or keeps failing to restart).
        """
        self.binary, self.version = await anyio.to_thread.run_sync(self._resolve_binary)
        try:
            await self._first_start()
            _write_atomic(url_file(self.state_dir), self.url + "\n")
            task_status.started(self.url)
            await self._keep_running()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()
                self._remove_url_file()

    # -- start -------------------------------------------------------------------
    def _resolve_binary(self) -> tuple[Path, tuple[int, int, int]]:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the bus's data
        if self.binary is not None:
            return self.binary, check_redis_server(self.binary)
        return find_redis_server()

    def _candidate_ports(self) -> list[int]:
        if self._fixed_port:
            return [self.port]
        ports: list[int] = []
        try:
            remembered = int((self.state_dir / PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            remembered = 0
        if remembered and port_is_free(remembered):
            ports.append(remembered)
        while len(ports) < 5:
            ports.append(pick_free_port())
        return ports

    async def _first_start(self) -> None:
        await self._wait_for_stale_server()
        for port in self._candidate_ports():
            self.port = port
            if await self._start_once():
                _write_atomic(self.state_dir / PORT_FILE, f"{port}\n")
                return
        raise EmbeddedRedisError(
            f"embedded redis-server did not start on 127.0.0.1:{self.port}: "
            f"{_log_tail(self.data_dir) or 'no log'} (see {self.data_dir / 'redis.log'})"
        )

    async def _wait_for_stale_server(self) -> None:
        """Never run two servers on one AOF: wait for a dying predecessor to exit."""
        pid_file = self.data_dir / PID_FILE
        pid = _stale_server_pid(pid_file)
        if pid is None:
            return
        _log().warning("embedded_redis_waiting_for_previous", pid=pid, data_dir=str(self.data_dir))
        deadline = anyio.current_time() + self.stop_timeout
        while anyio.current_time() < deadline:
            await anyio.sleep(0.2)  # not our child: nothing to wait on but its pid
            if _stale_server_pid(pid_file) is None:
                return
        raise EmbeddedRedisError(
            f"another redis-server (pid {pid}) still uses {self.data_dir} (a supervisor "
            "already running on this state_dir?); stop it first"
        )

    async def _start_once(self) -> bool:
        """Spawn on ``self.port`` and wait for PING; False (child reaped) on failure."""
        assert self.binary is not None
        command = RedisServerProcess(
            data_dir=self.data_dir,
            port=self.port,
            binary=self.binary,
            extra_args=["--pidfile", str(self.data_dir / PID_FILE)],
        ).command()
        self._proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_death_signal_setter(os.getpid()),
        )
        self._started_at = time.monotonic()
        if await self._wait_ready():
            _log().info(
                "embedded_redis_started",
                url=self.url,
                pid=self._proc.pid,
                version=".".join(map(str, self.version)),
                binary=str(self.binary),
                data_dir=str(self.data_dir),
            )
            return True
        reason = _describe_exit(self._proc.returncode)
        await self._kill()
        _log().warning(
            "embedded_redis_start_failed",
            port=self.port,
            reason=reason,
            log_tail=_log_tail(self.data_dir),
        )
        return False

    async def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                return False
            if await _answers_ping(self.port):
                return True
            await anyio.sleep(0.02)
        return False

    # -- supervise ---------------------------------------------------------------
    async def _keep_running(self) -> None:
        """Wait for the server to exit; restart it on the same port with backoff."""
        failed = 0
        while True:
            assert self._proc is not None
            returncode = await self._proc.wait()
            uptime = time.monotonic() - self._started_at
            _log().error(
                "embedded_redis_exited",
                pid=self._proc.pid,
                reason=_describe_exit(returncode),
                uptime=round(uptime, 3),
                log_tail=_log_tail(self.data_dir),
            )
            if uptime >= self.stable_after:
                failed = 0
            while True:
                delay = min(self.backoff_max, self.backoff_initial * 2**failed)
                await anyio.sleep(delay)
                failed += 1
                if await self._start_once():
                    self.restarts += 1
                    _log().info("embedded_redis_restarted", url=self.url, restarts=self.restarts)
                    break
                if failed >= self.max_failed_starts:
                    raise EmbeddedRedisError(
                        f"embedded redis-server failed to restart {failed} times on "
                        f"127.0.0.1:{self.port}: {_log_tail(self.data_dir) or 'no log'}"
                    )

    # -- stop --------------------------------------------------------------------
    async def _stop(self) -> None:
        """SIGTERM (AOF is flushed), SIGKILL to its process group after the timeout."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.stop_timeout):
            await proc.wait()
            _log().info(
                "embedded_redis_stopped", pid=proc.pid, reason=_describe_exit(proc.returncode)
            )
            return
        _log().warning("embedded_redis_stop_timeout", pid=proc.pid, timeout=self.stop_timeout)
        await self._kill()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    def _remove_url_file(self) -> None:
        path = url_file(self.state_dir)
        with contextlib.suppress(OSError):
            if path.read_text().strip() == self.url:
                path.unlink()


async def run_embedded_redis(
    state_dir: Path,
    port: int = 0,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    binary: Path | None = None,
    stop_timeout: float = 10.0,
) -> None:
    """Run the embedded redis-server until cancelled; ``task_status.started(url)``.

    Use with ``url = await task_group.start(run_embedded_redis, state_dir)``.
    Raises :class:`RedisServerError` (no binary / older than 6.2) or
    :class:`EmbeddedRedisError` (cannot start) before ``started`` is called,
    and :class:`EmbeddedRedisError` later if it crashes and cannot be restarted.
    """
    server = EmbeddedRedis(state_dir, port, binary=binary, stop_timeout=stop_timeout)
    await server.run(task_status=task_status)
