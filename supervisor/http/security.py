"""What the HTTP server may show and who may call it: bind check, bearer token,
browser guards (Host, Origin, Content-Type), scrubbing.

Kept apart from the routes so the rules that protect secrets and the control
API can be read (and tested) in one place. The browser guards exist because a
loopback API without a token is still reachable from any web page the
operator opens: a cross-site ``text/plain`` POST needs no CORS preflight, and
DNS rebinding makes ``evil.example`` resolve to 127.0.0.1. So every request
must name a loopback (or explicitly allowed) ``Host``; a request carrying an
``Origin`` must come from this server's own origin; a POST must say
``Content-Type: application/json`` (which a page can only send after a
preflight we never answer).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import fields, is_dataclass
from typing import Any

from supervisor.fleet.snapshot import ControlError

#: Keys never shown by ``/status`` even if a future snapshot grows them.
SECRET_KEYS = frozenset({"env", "environment", "password", "token", "secret", "secrets"})

#: ``scheme://user:PASSWORD@`` anywhere in a string (worker status lines, errors).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(@)")


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from another machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname or "" (all interfaces): assume reachable


def check_bind_allowed(host: str, token: str | None) -> None:
    """Refuse an open control API on a reachable address."""
    if not token and not is_loopback(host):
        raise ControlError(
            f"refusing to serve the control API on non-loopback address {host!r} without a "
            "token: set AG1_CONTROL_TOKEN or listen on 127.0.0.1"
        )


def bearer_authorized(header: str, token: str | None) -> bool:
    """True when no token is set, or ``header`` is ``Bearer <token>`` (constant-time).

    Header bytes that are not UTF-8 arrive as surrogates: they never match.
    """
    if not token:
        return True
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    try:
        given_bytes = given.strip().encode()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(given_bytes, token.encode())


def _split_host(value: str) -> tuple[str, str]:
    """``"host:port"`` / ``"[v6]:port"`` / ``"host"`` -> (host lowercased, port or "")."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, sep, port = value.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return value, ""
    return host, port


class RequestGuard:
    """Host, Origin and Content-Type rules; :meth:`refusal` says why a request is refused.

    ``allowed_hosts`` adds names (or addresses) besides loopback that clients
    may use in ``Host``; ``"*"`` allows any (only behind a proxy that checks).
    The address the server listens on is allowed when it is a specific one.
    """

    def __init__(self, listen_host: str, allowed_hosts: tuple[str, ...] | list[str] = ()) -> None:
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        listen = listen_host.strip("[]").lower()
        if listen and listen not in ("0.0.0.0", "::"):
            hosts.add(listen)
        self.allowed = frozenset(hosts)

    def host_allowed(self, host: str) -> bool:
        name = _split_host(host)[0].rstrip(".")
        if not name:
            return False
        return is_loopback(name) or name in self.allowed or "*" in self.allowed

    def refusal(
        self, method: str, host: str | None, origin: str | None, content_type: str
    ) -> str | None:
        """None when the request may proceed, else the reason (logged, sent with the 403)."""
        if host is None or not self.host_allowed(host):
            return f"host {host!r} is not a loopback address or an allowed_hosts entry"
        if origin is not None:
            if origin.strip().lower() == "null":
                return "origin 'null' is not allowed"
            scheme, sep, rest = origin.strip().partition("://")
            if (
                not sep
                or scheme.lower() not in ("http", "https")
                or _split_host(rest) != _split_host(host)
            ):
                return f"origin {origin!r} is not this server's own"
        if method not in ("GET", "HEAD", "OPTIONS"):
            mime = content_type.split(";", 1)[0].strip().lower()
            if mime != "application/json":
                return (
                    f"content type {mime or 'none'!r}: control requests must send application/json"
                )
        return None


def scrub(value: Any) -> Any:
    """Plain JSON data from dataclasses, dicts and lists, in one pass.

    Secret-looking keys are dropped and URL passwords redacted on the way.
    This replaces ``dataclasses.asdict`` (which deep-copies every leaf and
    costs ~6x more): ``/status`` must stay cheap at hundreds of requests/s.
    """
    if isinstance(value, str):
        if "://" in value and "@" in value:
            return _URL_PASSWORD.sub(r"\1***\2", value)
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): scrub(v) for k, v in value.items() if str(k).lower() not in SECRET_KEYS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    names = _field_names(type(value))
    if names is not None:
        return {name: scrub(getattr(value, name)) for name in names if name not in SECRET_KEYS}
    return str(value)


_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """Dataclass field names of ``cls`` (None if not a dataclass), cached per type."""
    try:
        return _FIELDS[cls]
    except KeyError:
        names = tuple(f.name for f in fields(cls)) if is_dataclass(cls) else None
        _FIELDS[cls] = names
        return names
