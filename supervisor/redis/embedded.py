"""The supervisor's private redis-server for ``[redis] url = "embedded"``.

One child process, owned by the caller's task group: AOF on, data under
``<state_dir>/redis``, listening on the unix socket ``<state_dir>/redis.sock``
in the 0700 state dir (TCP on 127.0.0.1 only when ``embedded_port`` is set),
with a password generated at first start (``<state_dir>/redis.password``, 0600)
and the dangerous admin commands denied (:mod:`supervisor.redis.hardening`).
Its full URL, password included, is written to ``<state_dir>/redis.url`` (0600)
so ``ag1-bus --state-dir`` and ``ag1-fleet status`` can find it; it is never
logged unredacted. The server family and AOF layout are recorded in the data
dir and a binary that cannot read them is refused (:mod:`supervisor.redis.layout`).
A crashed server is restarted with backoff on the same socket and data dir, so
clients simply reconnect. Cancellation stops it with SIGTERM (Redis flushes the
AOF), SIGKILL after a timeout.

The binary lookup comes from :mod:`supervisor.redis.server` (>= 7.0; the
bundled Valkey unless PATH has something newer, ``AG1_REDIS_SERVER`` forces it).
The server runs on the same child-process and lifecycle code as the workers:
:class:`~supervisor.runtime.process.ChildProcess` (own process group,
parent-death signal armed before exec, pidfd exit notice, reaped on every exit
path) and :class:`~supervisor.runtime.lifecycle.WorkerLifecycle` (restart with
jittered backoff, a start limit that ends in an error instead of a restart loop).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil

from core_bus.log import get_logger
from core_bus.settings import redact_url
from supervisor.redis.hardening import (
    CONFIG_FILE,
    HardeningError,
    embedded_url,
    load_or_create_password,
    private_state_dir,
    server_config,
    socket_path,
    write_private,
)
from supervisor.redis.layout import LayoutError, check_layout, write_record
from supervisor.redis.server import (
    RedisServerError,
    check_redis_server,
    find_redis_server,
    redis_server_identity,
)
from supervisor.runtime.lifecycle import (
    CAUSE_STOP,
    ExitInfo,
    RestartPolicy,
    WorkerLifecycle,
    WorkerState,
)
from supervisor.runtime.process import ChildProcess, ExitStatus

URL_FILE = "redis.url"
DATA_SUBDIR = "redis"
PID_FILE = "redis-server.pid"


def _log() -> Any:
    # Looked up per event (rare here): a module-level bound logger would freeze
    # the structlog configuration of import time.
    return get_logger("supervisor.redis.embedded")


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


async def _answers_ping(socket: Path, password: str) -> bool:
    """True once the server replies +PONG (not -LOADING while it replays the AOF)."""
    reply = b""
    try:
        with anyio.fail_after(1.0):
            async with await anyio.connect_unix(socket) as stream:
                await stream.send(f"AUTH {password}\r\nPING\r\n".encode())
                while reply.count(b"\r\n") < 2:
                    reply += await stream.receive(256)
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False
    return reply.startswith(b"+OK\r\n+PONG")


def _stale_server_pid(pid_file: Path) -> int | None:
    """Pid of a redis-server left by an earlier run that still uses our data dir."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        name = proc.name()
        if ("redis" in name or "valkey" in name) and proc.status() != psutil.STATUS_ZOMBIE:
            return pid
    except psutil.Error:
        pass
    return None


class EmbeddedRedis:
    """A supervised private redis-server; :meth:`run` owns it until cancelled.

    ``port=0`` means the unix socket only; a port also listens on 127.0.0.1.
    Attributes ``url`` (with the password: never log it), ``pid``,
    ``restarts``, ``family`` and ``version`` describe the running server.
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
        self.state_dir = Path(state_dir).absolute()
        self.data_dir = self.state_dir / DATA_SUBDIR
        self.socket = self.state_dir / "redis.sock"
        self.port = port
        self.binary = binary
        self.family = "redis"
        self.version: tuple[int, int, int] = (0, 0, 0)
        self._password = ""
        self._published = False  # we wrote redis.url (a refused second run must not remove it)
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.max_failed_starts = max_failed_starts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.restarts = 0
        self._process: ChildProcess | None = None
        self._lifecycle = WorkerLifecycle(
            RestartPolicy(
                restart="always",
                backoff_initial=backoff_initial,
                backoff_max=backoff_max,
                backoff_reset_after=stable_after,
                start_limit=max_failed_starts,
                start_limit_window=max(60.0, stable_after * max_failed_starts),
                start_timeout=start_timeout,
            )
        )

    @property
    def url(self) -> str:
        """The full URL, password included (what workers get as ``REDIS_URL``)."""
        return embedded_url(self.socket, self._password)

    @property
    def where(self) -> str:
        """Where it listens, for messages (no secret)."""
        return str(self.socket) + (f" and 127.0.0.1:{self.port}" if self.port else "")

    @property
    def pid(self) -> int | None:
        """Pid of the live server process (None between a crash and its restart)."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start, report the URL through ``task_status``, keep it up until cancelled.

        Raises :class:`RedisServerError` when no usable binary exists or it is
        older than 7.0, and :class:`EmbeddedRedisError` when it cannot start
        (or keeps failing to restart, or the data dir belongs to another server).
        """
        await anyio.to_thread.run_sync(self._prepare)
        try:
            await self._first_start()
            write_record(self.data_dir, self.family, self.version)
            write_private(url_file(self.state_dir), self.url + "\n")
            self._published = True
            task_status.started(self.url)
            await self._keep_running()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop()
                self._remove_url_file()

    # -- start -------------------------------------------------------------------
    def _prepare(self) -> None:
        """Binary, private dirs, socket path, password and the data dir's owner (a thread)."""
        try:
            private_state_dir(self.state_dir)
            self.socket = socket_path(self.state_dir)
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the bus's data
            if self.binary is None:
                self.binary, _ = find_redis_server()
            else:
                check_redis_server(self.binary)
            self.family, self.version = redis_server_identity(self.binary)
            check_layout(self.data_dir, self.family, self.version, self.binary)
            self._password = load_or_create_password(self.state_dir)
        except (HardeningError, LayoutError) as exc:
            raise EmbeddedRedisError(str(exc)) from None
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot prepare {self.state_dir}: {exc}") from None

    async def _first_start(self) -> None:
        await self._wait_for_stale_server()
        self._lifecycle.request_start(anyio.current_time())
        if not await self._start_once():
            raise EmbeddedRedisError(
                f"embedded redis-server did not start on {self.where}: "
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
        """Spawn and wait for PING; False (child reaped) on failure."""
        assert self.binary is not None
        config = self.data_dir / CONFIG_FILE
        write_private(
            config,
            server_config(
                data_dir=self.data_dir,
                socket=self.socket,
                password=self._password,
                port=self.port,
                pidfile=self.data_dir / PID_FILE,
            ),
        )
        command = [str(self.binary), str(config)]  # the password never on the command line
        lifecycle = self._lifecycle
        lifecycle.on_spawned(anyio.current_time())
        try:
            process = ChildProcess.spawn(
                command, env=os.environ, capture_output=False, pdeathsig=True
            )
        except (OSError, ValueError) as exc:
            reason = f"spawn failed: {exc}"
            lifecycle.on_exit(anyio.current_time(), ExitInfo(code=127, reason=reason))
            _log().warning("embedded_redis_start_failed", where=self.where, reason=reason)
            return False
        self._process = process
        if await self._wait_ready(process):
            lifecycle.on_ready(anyio.current_time())
            _log().info(
                "embedded_redis_started",
                url=redact_url(self.url),
                port=self.port or None,
                pid=process.pid,
                server=self.family,
                version=".".join(map(str, self.version)),
                binary=str(self.binary),
                data_dir=str(self.data_dir),
            )
            return True
        status = process.poll()
        reason = status.describe(we_sent_kill=False) if status is not None else "start timeout"
        await process.aclose()
        self._record_exit(process.poll(), reason)
        _log().warning(
            "embedded_redis_start_failed",
            where=self.where,
            reason=reason,
            log_tail=_log_tail(self.data_dir),
        )
        return False

    async def _wait_ready(self, process: ChildProcess) -> bool:
        deadline = anyio.current_time() + self.start_timeout
        while anyio.current_time() < deadline:
            if process.poll() is not None:
                return False
            if await _answers_ping(self.socket, self._password):
                return True
            with anyio.move_on_after(0.02):  # or at once when it exits
                await process.wait()
        return False

    def _record_exit(self, status: ExitStatus | None, reason: str) -> WorkerState:
        code, sig = (status.code, status.signal) if status is not None else (None, None)
        return self._lifecycle.on_exit(anyio.current_time(), ExitInfo(code, sig, None, reason))

    # -- supervise ---------------------------------------------------------------
    async def _keep_running(self) -> None:
        """Wait for the server to exit; restart it on the same socket as the lifecycle says."""
        lifecycle = self._lifecycle
        while True:
            process = self._process
            assert process is not None
            if process.poll() is None:
                status = await process.wait()
                await process.aclose()
                reason = status.describe(we_sent_kill=process.sent_kill)
                uptime = anyio.current_time() - (lifecycle.started_at or 0.0)
                _log().error(
                    "embedded_redis_exited",
                    pid=process.pid,
                    reason=reason,
                    uptime=round(uptime, 3),
                    log_tail=_log_tail(self.data_dir),
                )
                self._record_exit(status, reason)
            if lifecycle.state == WorkerState.FATAL:
                raise EmbeddedRedisError(
                    f"embedded redis-server keeps failing on {self.where} "
                    f"({lifecycle.fatal_reason}): {_log_tail(self.data_dir) or 'no log'}"
                )
            deadline = lifecycle.next_deadline()
            if deadline is not None:
                await anyio.sleep(max(0.0, deadline - anyio.current_time()))
            action = lifecycle.tick(anyio.current_time())
            if action is not None and action.kind == "spawn" and await self._start_once():
                self.restarts += 1
                _log().info(
                    "embedded_redis_restarted", url=redact_url(self.url), restarts=self.restarts
                )

    # -- stop --------------------------------------------------------------------
    async def _stop(self) -> None:
        """SIGTERM (AOF is flushed), SIGKILL to its process group after the timeout."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            self._lifecycle.on_stop_requested(CAUSE_STOP)
            status = await process.stop(self.stop_timeout, signal.SIGTERM)
            if process.sent_kill:
                _log().warning(
                    "embedded_redis_stop_timeout", pid=process.pid, timeout=self.stop_timeout
                )
            _log().info(
                "embedded_redis_stopped",
                pid=process.pid,
                reason=status.describe(we_sent_kill=process.sent_kill),
            )
        await process.aclose()

    def _remove_url_file(self) -> None:
        path = url_file(self.state_dir)
        if not self._published:
            return
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
    Raises :class:`RedisServerError` (no binary / older than 7.0) or
    :class:`EmbeddedRedisError` (cannot start) before ``started`` is called,
    and :class:`EmbeddedRedisError` later if it crashes and cannot be restarted.
    """
    server = EmbeddedRedis(state_dir, port, binary=binary, stop_timeout=stop_timeout)
    await server.run(task_status=task_status)
