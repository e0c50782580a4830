"""What keeps the embedded server private: socket, password, denied commands.

The server listens on a unix socket in the 0700 state dir (TCP on loopback only
when ``[redis] embedded_port`` asks for it) and requires a password generated at
first start and kept in ``<state_dir>/redis.password`` (0600). Everything secret
goes into a 0600 config file, never onto the command line (``/proc/<pid>/cmdline``
is readable by every local user). The ``default`` user may not run the commands
that turn a Redis into a file writer or a remote-controlled copy of itself:
CONFIG, DEBUG, MODULE, ACL, SAVE/BGSAVE, REPLICAOF/SLAVEOF, SYNC/PSYNC,
FAILOVER, MIGRATE, SHUTDOWN, MONITOR; protected configs, DEBUG and MODULE are
switched off as well.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

PASSWORD_FILE = "redis.password"
SOCKET_FILE = "redis.sock"
CONFIG_FILE = "redis.conf"

#: Commands no client of the embedded server may run.
DENIED_COMMANDS = (
    "config",
    "debug",
    "module",
    "acl",
    "save",
    "bgsave",
    "replicaof",
    "slaveof",
    "sync",
    "psync",
    "failover",
    "migrate",
    "shutdown",
    "monitor",
)

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class HardeningError(RuntimeError):
    """The state dir cannot hold the embedded server's private files."""


def private_state_dir(state_dir: Path) -> Path:
    """Create ``state_dir`` (0700) or tighten it to 0700; return it absolute."""
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if state_dir.stat().st_mode & 0o077:
        os.chmod(state_dir, 0o700)
    return state_dir


def socket_path(state_dir: Path) -> Path:
    """The unix socket path; :class:`HardeningError` when too long for the kernel."""
    path = Path(state_dir).absolute() / SOCKET_FILE
    if any(ch in str(path) for ch in '"\n\r\\'):
        raise HardeningError(
            f"state_dir {str(state_dir)!r} contains a quote, backslash or line break: "
            "choose a plain path for the embedded Redis"
        )
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise HardeningError(
            f"state_dir {state_dir} is too long for the embedded Redis socket "
            f"({len(os.fsencode(path))} > {MAX_SOCKET_PATH} bytes): use a shorter "
            "[supervisor] state_dir"
        )
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_or_create_password(state_dir: Path) -> str:
    """The server's password: read from ``redis.password``, generated on first start."""
    path = Path(state_dir) / PASSWORD_FILE
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if password:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return password
    password = secrets.token_urlsafe(32)  # URL-safe: no quoting in redis:// or unix:// URLs
    write_private(path, password + "\n")
    return password


def server_config(
    *,
    data_dir: Path,
    socket: Path,
    password: str,
    port: int,
    pidfile: Path,
) -> str:
    """The redis.conf text (the password only as its SHA-256, as ACL rules allow)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    denied = " ".join(f"-{name}" for name in DENIED_COMMANDS)
    lines = [
        f"port {port}",
        "bind 127.0.0.1",  # TCP only when a port is asked for, and then loopback only
        "protected-mode yes",
        f'unixsocket "{socket}"',
        "unixsocketperm 700",
        f'dir "{data_dir}"',
        'save ""',
        "appendonly yes",
        "appendfsync everysec",
        "daemonize no",
        f'logfile "{data_dir / "redis.log"}"',
        f'pidfile "{pidfile}"',
        "enable-protected-configs no",
        "enable-debug-command no",
        "enable-module-command no",
        f"user default on #{digest} ~* &* +@all {denied}",
    ]
    return "\n".join(lines) + "\n"


def embedded_url(socket: Path, password: str) -> str:
    """``unix://:PASSWORD@/abs/redis.sock``: what redis-py's ``from_url`` and ``ag1-bus`` read."""
    return f"unix://:{password}@{socket}"
