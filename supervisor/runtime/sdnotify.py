"""Send sd_notify datagrams (READY=1, WATCHDOG=1, STATUS=...) to ``$NOTIFY_SOCKET``.

The same tiny client serves the supervisor (talking to systemd) and workers
(talking to the supervisor). Without ``NOTIFY_SOCKET`` it does nothing, so a
program behaves the same under and outside supervision.
"""

from __future__ import annotations

import os
import socket


def notify_socket_address(value: str | None = None) -> str | None:
    """The datagram address from ``$NOTIFY_SOCKET`` ('@' = Linux abstract namespace)."""
    path = value if value is not None else os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


class Notifier:
    """A reusable sender; cheap enough to call from a heartbeat loop."""

    def __init__(self, address: str | None = None) -> None:
        self.address = notify_socket_address(address)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram made of ``lines``; False when disabled or the peer is gone."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def sd_notify(*lines: str) -> bool:
    """One-shot send to ``$NOTIFY_SOCKET``; returns False when not supervised."""
    notifier = Notifier()
    try:
        return notifier.send(*lines)
    finally:
        notifier.close()
