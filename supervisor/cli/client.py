"""Client side of the control API, used by ``ag1-fleet status/restart/...``.

Plain ``urllib`` (blocking, one request per command): the CLI needs no event
loop and starts fast. Every failure becomes :class:`ControlClientError` with
one line meant for the operator; no traceback reaches the terminal.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.config.listen import parse_listen
from supervisor.config.units import parse_duration

DEFAULT_LISTEN = "127.0.0.1:8765"
DEFAULT_REQUEST_TIMEOUT = "5s"  # [http] request_timeout's default
TOKEN_ENV = "AG1_CONTROL_TOKEN"
#: Longer than the server's request_timeout, so a slow call comes back as 202, not a timeout.
DEFAULT_TIMEOUT = 30.0


class ControlClientError(Exception):
    """A request failed; ``str()`` is the one line to show. ``status`` is the HTTP code if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


def url_from_listen(listen: str) -> str:
    """The URL a local client uses for a ``host:port`` listen address.

    Wildcard binds (``0.0.0.0``, ``::``) are reached over loopback.
    """
    host, port = parse_listen(listen)
    if port == 0:
        raise ControlClientError(
            f"the config listens on {listen!r} (a random port): pass --url instead"
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        host = "127.0.0.1" if ip.version == 4 else "::1"
        ip = ipaddress.ip_address(host)
    if ip is not None and ip.version == 6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def listen_from_config(path: str | Path) -> tuple[str, float | None]:
    """``[http] listen`` and ``request_timeout`` of the fleet config, ``AG1_HTTP__*``
    overrides included.

    Read from the TOML alone (no pydantic, no validation of the rest): a control
    command starts fast, and a config the supervisor would reject still yields its
    address, so ``ag1-fleet reload`` can report the supervisor's own rejection of
    a broken file. A timeout that does not parse is unknown (``None``).
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ControlClientError(f"cannot find the control API address in {path}: {exc}") from None
    section = raw.get("http", {})
    section = section if isinstance(section, dict) else {}
    listen = os.environ.get("AG1_HTTP__LISTEN") or section.get("listen", DEFAULT_LISTEN)
    if not isinstance(listen, str):
        raise ControlClientError(f"{path}: http.listen must be a string like '127.0.0.1:8765'")
    timeout_value = os.environ.get("AG1_HTTP__REQUEST_TIMEOUT") or section.get(
        "request_timeout", DEFAULT_REQUEST_TIMEOUT
    )
    try:
        timeout: float | None = parse_duration(timeout_value)
    except ValueError:
        timeout = None
    return listen, timeout


def resolve_target(config: str | None, url: str | None) -> tuple[str, float]:
    """Base URL and client timeout: ``--url`` if given, else the config's listen address.

    The timeout outlasts the server's ``request_timeout`` (when the config
    says it), so a long call comes back as 202 rather than a client timeout.
    """
    if url:
        return url.rstrip("/"), DEFAULT_TIMEOUT
    server_timeout: float | None = None
    if config and Path(config).exists():
        listen, server_timeout = listen_from_config(config)
    else:
        listen = os.environ.get("AG1_HTTP__LISTEN", DEFAULT_LISTEN)
    try:
        base = url_from_listen(listen)
    except ValueError as exc:
        raise ControlClientError(str(exc)) from None
    timeout = max(DEFAULT_TIMEOUT, server_timeout + 10) if server_timeout else DEFAULT_TIMEOUT
    return base, timeout


def resolve_base_url(config: str | None, url: str | None) -> str:
    """Only the base URL of :func:`resolve_target`."""
    return resolve_target(config, url)[0]


def token_from_env() -> str | None:
    """``AG1_CONTROL_TOKEN``, else ``AG1_HTTP__TOKEN`` (the config's env override)."""
    return os.environ.get(TOKEN_ENV) or os.environ.get("AG1_HTTP__TOKEN") or None


class ControlClient:
    """One supervisor's control API."""

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str) -> Reply:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Reply:
        return self._request("POST", path, body if body is not None else {})

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> Reply:
        """Any HTTP status comes back as a Reply; only transport failures raise."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token and (method != "GET" or path.startswith("/v1/")):  # GET /v1/fleet too
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return Reply(resp.status, self._decode(resp.read()))
        except urllib.error.HTTPError as exc:
            with exc:
                return Reply(exc.code, self._decode(exc.read()))
        except urllib.error.URLError as exc:
            raise ControlClientError(self._unreachable(exc.reason)) from None
        except TimeoutError:
            raise ControlClientError(
                f"supervisor at {self.base_url} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as exc:  # reset by peer mid-reply, etc.
            raise ControlClientError(self._unreachable(exc)) from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            text = "connection refused"
        elif isinstance(reason, TimeoutError):
            text = f"no answer within {self.timeout:g}s"
        elif isinstance(reason, OSError) and reason.strerror:
            text = reason.strerror[:1].lower() + reason.strerror[1:]
        else:
            text = str(reason)
        return f"cannot reach supervisor at {self.base_url}: {text}"

    def _decode(self, raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            snippet = raw[:80].decode(errors="replace").strip()
            raise ControlClientError(
                f"{self.base_url} did not answer like an ag1-fleet supervisor: {snippet!r}"
            ) from None
        return data if isinstance(data, dict) else {"value": data}
