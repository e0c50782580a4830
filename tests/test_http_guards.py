"""The control API cannot be driven from a web page, and bad input gets 4xx, never 500.

A real server on a real socket (the daemon played by FakeControl, which records
every control call). Raw sockets where a client library would refuse to send
what an attacker sends (non-ASCII header bytes, a foreign Host).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from tests.test_http import fetch, serve
from tests.test_http_fakes import FakeControl

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as-is; the status code and body of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def raw(url: str, request: bytes) -> tuple[int, bytes]:
    return await anyio.to_thread.run_sync(_raw, url, request)


def _refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == "http_refused"]


async def test_cross_site_text_plain_post_cannot_stop_an_agent() -> None:
    """The page's form POST (text/plain, Origin: evil) is refused and logged once."""
    control = FakeControl()
    async with serve(control) as url:
        with capture_logs() as logs:
            status, body = await fetch(
                "POST",
                url + "/v1/agents/echo/stop",
                data=b'{"x": 1}',
                headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
            )
        assert status == 403, body
        assert "origin" in body["error"]
        assert control.calls == []
        (event,) = _refusals(logs)
        assert "evil.example" in event["reason"] and event["path"] == "/v1/agents/echo/stop"


async def test_post_without_json_content_type_is_refused() -> None:
    control = FakeControl()
    async with serve(control) as url:
        for headers in (
            {"Content-Type": "text/plain"},
            {},
            {"Content-Type": "multipart/form-data"},
        ):
            with capture_logs() as logs:
                status, body = await raw(
                    url,
                    b"POST /v1/agents/echo/stop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
                    + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
                )
            assert status == 403, body
            assert b"application/json" in body
            assert len(_refusals(logs)) == 1
        assert control.calls == []
        status, _ = await fetch(
            "POST",
            url + "/v1/agents/echo/stop",
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert status == 200
        assert control.calls == [("stop", "echo")]


async def test_dns_rebinding_host_is_refused_for_every_route() -> None:
    """``Host: evil.example`` (a rebinding page) gets 403 on GETs too; loopback names pass."""
    control = FakeControl()
    async with serve(control) as url:
        port = url.rsplit(":", 1)[1]
        for path in ("/status", "/readyz", "/metrics", "/livez"):
            with capture_logs() as logs:
                status, _ = await raw(
                    url,
                    f"GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\n"
                    "Connection: close\r\n\r\n".encode(),
                )
            assert status == 403, path
            (event,) = _refusals(logs)
            assert "evil.example" in event["reason"]
        status, _ = await raw(url, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status in (400, 403)  # no Host at all
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "127.0.0.2"):
            status, _ = await raw(
                url, f"GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            assert status == 200, host


async def test_allowed_hosts_entry_passes() -> None:
    async with serve(FakeControl(), allowed_hosts=["fleet.internal"]) as url:
        port = url.rsplit(":", 1)[1]
        status, _ = await raw(
            url,
            f"GET /status HTTP/1.1\r\nHost: fleet.internal:{port}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status == 200
        status, _ = await raw(
            url, b"GET /status HTTP/1.1\r\nHost: other.internal\r\nConnection: close\r\n\r\n"
        )
        assert status == 403


async def test_own_origin_passes_and_foreign_or_null_origins_do_not() -> None:
    control = FakeControl()
    async with serve(control) as url:
        status, _ = await fetch("POST", url + "/v1/agents/echo/stop", headers={"Origin": url})
        assert status == 200
        for origin in ("null", "http://evil.example", url.replace("http:", "file:"), url + "1"):
            status, _ = await fetch(
                "POST", url + "/v1/agents/echo/start", headers={"Origin": origin}
            )
            assert status == 403, origin
        assert control.calls == [("stop", "echo")]


async def test_non_ascii_authorization_is_401_not_500() -> None:
    control = FakeControl()
    async with serve(control, token="s3cret") as url:
        for value in (
            b"Bearer \xc3\xa9t\xc3\xa9",
            b"Bearer \xff\xfe",
            "Bearer s3cret\u00e9".encode(),
        ):
            status, body = await raw(
                url,
                b"POST /v1/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                + value
                + b"\r\nContent-Type: application/json\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n",
            )
            assert status == 401, (value, body)
        assert control.calls == []


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"replicas": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"replicas": ' + b"9" * 5_000 + b"}",
        b'{"rolling": 1e999999}',
        b'{"replicas": "\xff"}',
    ],
    ids=["deep-array", "deep-field", "5000-digits", "huge-float", "bad-utf8"],
)
async def test_hostile_json_bodies_are_400(body: bytes) -> None:
    control = FakeControl()
    async with serve(control, max_body=256 * 1024) as url:
        for path in ("/v1/agents/echo/scale", "/v1/agents/echo/restart"):
            status, answer = await fetch(
                "POST", url + path, data=body, headers={"Content-Type": "application/json"}
            )
            assert status == 400, (path, answer)
        assert control.calls == []
