"""The control API's listening sockets, bound before anything else starts.

``ag1-fleet run`` binds them first thing (before the embedded Redis and any
worker), so a port in use or a refused address ends the run at once with one
line that says what to change, and nothing has been started in vain.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from supervisor.fleet.snapshot import ControlError
from supervisor.http.security import check_bind_allowed

BACKLOG = 128


def _in_use_hint(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return (
        f" (another ag1-fleet, or another program, listens there: stop it, or choose a free "
        f"port with AG1_HTTP__LISTEN={shown}:{port + 1} or [http] listen in the config)"
    )


def bind_http(http: Any, token: str | None) -> list[socket.socket]:
    """One listening socket per address ``http.host`` resolves to (non-blocking).

    :raises ControlError: an open control API on a reachable address, or the address
        cannot be bound (the port-in-use message suggests ``AG1_HTTP__LISTEN``).
    """
    host, port = str(http.host), int(http.port)
    check_bind_allowed(host, token)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ControlError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                hint = _in_use_hint(host, port) if exc.errno == errno.EADDRINUSE else ""
                raise ControlError(f"cannot listen on {host}:{port}: {reason}{hint}") from exc
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
