"""The supervisor's NOTIFY_SOCKET: receive sd_notify datagrams from children.

A unix datagram socket with SO_PASSCRED, so the kernel tells us the sender's
pid (it cannot be forged by the child). A datagram is attributed to a worker
when the sender pid is a worker pid, or when the sender's process group id is
one (so ``systemd-notify --ready`` run from a worker's shell counts). File
descriptors passed along (``BARRIER=1`` from ``systemd-notify``) are closed at
once, which is exactly what the barrier protocol asks of us.

The sender's process group is looked up *before* those fds are closed: the
barrier keeps a short-lived sender (``systemd-notify`` run by a shell agent
when we are not root reports its own pid) alive until then, and once released
it may exit before the daemon attributes the datagram, after which its pgid
can no longer be found.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio

from core_bus.log import get_logger

log = get_logger("supervisor.runtime.notify")

_UCRED = struct.Struct("3i")  # pid, uid, gid
MAX_DATAGRAM = 64 * 1024
RECV_BUFFER = 1 << 20


@dataclass
class NotifyMessage:
    """One datagram: its sender and its ``KEY=VALUE`` lines."""

    pid: int | None
    fields: dict[str, str] = field(default_factory=dict)
    #: The sender's process group, resolved while it was still alive (None: unknown).
    pgid: int | None = None

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def watchdog(self) -> bool:
        return self.fields.get("WATCHDOG") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")

    @property
    def stats(self) -> str | None:
        return self.fields.get("X_AG1_STATS")


def parse_datagram(data: bytes) -> dict[str, str]:
    """``KEY=VALUE`` per line; malformed lines are ignored (never raises)."""
    out: dict[str, str] = {}
    for raw in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = raw.partition("=")
        if sep and key:
            out[key.strip()] = value
    return out


def _creds_and_fds(ancdata: list[tuple[int, int, bytes]]) -> tuple[int | None, list[int]]:
    pid: int | None = None
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid = _UCRED.unpack_from(data)[0]
        elif kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return pid, fds


def process_group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
TMP_PREFIX = "ag1-fleet-"


def _is_stale(directory: Path) -> bool:
    """True when no one receives on ``directory/notify.sock`` any more (its owner died).

    A datagram ``connect`` to a socket file whose owner is gone fails with
    ECONNREFUSED; a live supervisor's socket accepts it. No pid guessing.
    """
    sock_path = directory / "notify.sock"
    if not sock_path.exists():
        # Between mkdtemp and bind a live supervisor's directory is empty too.
        try:
            return time.time() - directory.stat().st_mtime > 60
        except OSError:
            return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(sock_path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # not ours to judge (permissions, ...)
    finally:
        probe.close()
    return False


def remove_stale_directories(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix>*`` directories we own whose supervisor is gone."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for candidate in candidates:
        try:
            info = candidate.lstat()
        except OSError:
            continue
        if not candidate.is_dir() or candidate.is_symlink() or info.st_uid != os.geteuid():
            continue
        if _is_stale(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def notify_directory(state_dir: Path) -> Path:
    """A fresh private directory for this supervisor's socket, stale ones cleaned first.

    ``<state_dir>/run/notify-<pid>-XXXX`` (so a SIGKILLed supervisor leaves nothing in
    /tmp), or ``/tmp/ag1-fleet-<pid>-XXXX`` when that path is too long for a
    unix socket; leftovers of dead supervisors are removed from both places.
    """
    tmp = Path(tempfile.gettempdir())
    removed = remove_stale_directories(tmp, TMP_PREFIX)
    run_dir = Path(state_dir).absolute() / "run"
    # "notify-<pid>-" + 8 random characters + "/notify.sock"
    longest = run_dir / f"notify-{os.getpid()}-xxxxxxxx" / "notify.sock"
    if len(os.fsencode(longest)) <= _MAX_SOCKET_PATH:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed += remove_stale_directories(run_dir, "notify-")
        directory = Path(tempfile.mkdtemp(prefix=f"notify-{os.getpid()}-", dir=run_dir))
    else:
        directory = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    if removed:
        log.info("removed stale notify directories", directories=[str(p) for p in removed])
    return directory


class NotifyServer:
    """Owns the socket file (in a private 0700 directory) and its receive loop.

    With ``state_dir`` the directory is :func:`notify_directory`'s (and removed
    on close); with neither argument a fresh one in /tmp.
    ``resolve(pid)`` maps a pid to a worker key (or None); messages from
    unknown senders are dropped with a debug event.
    """

    def __init__(self, directory: Path | None = None, *, state_dir: Path | None = None) -> None:
        self._own_dir = directory is None
        if directory is None:
            directory = (
                notify_directory(state_dir)
                if state_dir is not None
                else Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
            )
        self.directory = directory
        self.path = self.directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.sock.bind(str(self.path))
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        self.received = 0
        self.unknown_senders = 0

    @property
    def address(self) -> str:
        return str(self.path)

    def receive_ready(self) -> list[NotifyMessage]:
        """Drain every datagram queued now (non-blocking)."""
        messages: list[NotifyMessage] = []
        fd_space = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(16 * 4)
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(MAX_DATAGRAM, fd_space)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError as exc:  # pragma: no cover - socket closed under us
                log.warning("notify receive failed", error=str(exc))
                return messages
            pid, fds = _creds_and_fds(ancdata)
            # Before releasing the barrier: the sender may exit right after.
            pgid = process_group_of(pid) if pid else None
            for fd in fds:  # BARRIER=1: closing the fd releases the sender
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.received += 1
            messages.append(NotifyMessage(pid, parse_datagram(data), pgid))

    async def serve(
        self,
        on_message: Callable[[NotifyMessage], None],
    ) -> None:
        """Receive until cancelled, calling ``on_message`` for each datagram.

        The socket stays registered with the event loop for the server's whole
        life (one epoll registration, no task switch per datagram): with 50
        workers heart-beating every second this is most of the idle cost.
        """
        loop = asyncio.get_running_loop()

        def readable() -> None:
            for message in self.receive_ready():
                try:
                    on_message(message)
                except Exception as exc:  # never let one datagram stop the server
                    log.warning("notify handler failed", error=f"{type(exc).__name__}: {exc}")

        loop.add_reader(self.sock.fileno(), readable)
        try:
            readable()  # anything queued before we registered
            await anyio.sleep_forever()
        finally:
            loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        """Close the socket and remove its file (and our private directory)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> NotifyServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SenderIndex:
    """pid -> worker key, also matching senders by process group id."""

    def __init__(self) -> None:
        self._by_pid: dict[int, str] = {}

    def add(self, pid: int, key: str) -> None:
        self._by_pid[pid] = key

    def remove(self, pid: int) -> None:
        self._by_pid.pop(pid, None)

    def resolve(self, pid: int | None, pgid: int | None = None) -> str | None:
        """The worker key for a sender pid, or for its process group.

        ``pgid`` is the group recorded when the datagram arrived
        (:attr:`NotifyMessage.pgid`); without it the group is looked up now,
        which fails once the sender has exited.
        """
        if pid is None:
            return None
        key = self._by_pid.get(pid)
        if key is not None:
            return key
        if pgid is None:
            pgid = process_group_of(pid)
        if pgid is not None:
            return self._by_pid.get(pgid)
        return None

    def resolve_message(self, message: NotifyMessage) -> str | None:
        return self.resolve(message.pid, message.pgid)
