"""A small, time-bounded HTTP fuzz run against the real daemon's control API: no 500s.

Hypothesis builds requests (method, path with hostile agent names, Host,
Origin, Content-Type, Authorization with non-ASCII bytes, JSON bodies from
deep nesting to 5,000-digit numbers, raw garbage) and sends them over a raw
socket to a running ``ag1-fleet run`` (a command agent, small limits so scaling
stays cheap). Every answer must be a well-formed HTTP response below 500, and
the daemon must still be serving and ready afterwards.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fleet_harness import agent_toml, cmd, listening_fleet, run_toml

pytestmark = pytest.mark.timeout(180)

SLEEP = "import time; time.sleep(120)"
FUZZ_SECONDS = 25.0

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(["replicas", "rolling", "x", "", "__proto__"])
bodies = st.one_of(
    st.just(b""),
    st.dictionaries(field_names, json_values, max_size=3).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([1, 50, 2_000, 30_000]).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([1, 20, 4_300, 5_000]).map(lambda n: b'{"replicas": ' + b"9" * n + b"}"),
    st.binary(max_size=200),
)
agent_names = st.one_of(
    st.sampled_from(["sleepy", "ghost", "", "..", "%00", "a" * 300]),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
)
paths = st.one_of(
    st.sampled_from(["/livez", "/readyz", "/status", "/metrics", "/v1/reload", "/", "/v1"]),
    st.tuples(agent_names, st.sampled_from(["restart", "scale", "stop", "start", "nope"])).map(
        lambda p: f"/v1/agents/{p[0]}/{p[1]}"
    ),
    st.text(max_size=30).map(lambda t: "/" + quote(t, safe="/?=&")),
)
header_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _header(name: bytes, values: st.SearchStrategy[bytes | None]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: b"" if v is None else name + b": " + v + b"\r\n")


CONTROL_PATHS = [
    "/v1/reload",
    *(f"/v1/agents/sleepy/{action}" for action in ("restart", "scale", "stop", "start")),
]


@st.composite
def requests(draw: st.DrawFn, port: int) -> bytes:
    """Half well-formed control calls with hostile bodies, half hostile everything."""
    if draw(st.booleans()):
        method, path = "POST", draw(st.sampled_from(CONTROL_PATHS))
        host, origin, content_type = f"127.0.0.1:{port}".encode(), None, b"application/json"
        auth = None
    else:
        method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]))
        path = draw(paths)
        host = draw(
            st.sampled_from([f"127.0.0.1:{port}", "localhost", "evil.example", "[::1]", ""]).map(
                str.encode
            )
            | header_bytes
        )
        origin = draw(
            st.none()
            | st.sampled_from([f"http://127.0.0.1:{port}", "http://evil.example", "null"]).map(
                str.encode
            )
            | header_bytes
        )
        content_type = draw(
            st.sampled_from([b"application/json", b"text/plain", b"application/json; x", None])
            | header_bytes
        )
        auth = draw(st.none() | header_bytes.map(lambda b: b"Bearer " + b))
    body = draw(bodies)
    head = f"{method} {path} HTTP/1.1\r\n".encode()
    head += b"Host: " + host + b"\r\n"
    head += draw(_header(b"Origin", st.just(origin)))
    head += draw(_header(b"Content-Type", st.just(content_type)))
    head += draw(_header(b"Authorization", st.just(auth)))
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    return head + body


def _send(port: int, request: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), (request[:300], data[:300])
    return int(status_line.split(b" ", 2)[1])


def _fuzz(port: int, deadline: float) -> list[int]:
    seen: list[int] = []

    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests(port))
    def one(request: bytes) -> None:
        if time.monotonic() > deadline:
            return  # time-bounded: the rest of the examples pass trivially
        status = _send(port, request)
        seen.append(status)
        assert status < 500, (status, request[:300])

    one()
    return seen


def test_control_api_fuzz_never_answers_500(
    tmp_path: Path, redis_url: str, python_exe: str
) -> None:
    toml = run_toml(
        agent_toml("sleepy", cmd(python_exe, SLEEP), max_replicas=2, start_seconds="0s"),
        name="fuzz",
        url=redis_url,
        listen="127.0.0.1:0",
        stop_timeout="3s",
        max_workers=3,
    )
    with listening_fleet(tmp_path, toml) as fleet:
        port = int(fleet.url.rsplit(":", 1)[1])
        seen = _fuzz(port, time.monotonic() + FUZZ_SECONDS)
        assert len(seen) > 50, "the fuzz run sent too few requests to mean anything"
        assert {400, 403, 404}.issubset(set(seen)), sorted(set(seen))
        livez = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        assert _send(port, livez) == 200
        assert fleet.proc.poll() is None
        assert not fleet.find("control_error")  # no daemon bug behind any answer
