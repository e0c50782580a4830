"""What the HTTP server may show and who may call it: bind check, bearer token, scrubbing.

Kept apart from the routes so the rules that protect secrets and the control
API can be read (and tested) in one place.
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
    """True when no token is set, or ``header`` is ``Bearer <token>`` (constant-time)."""
    if not token:
        return True
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


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
