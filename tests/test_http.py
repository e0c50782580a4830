"""The HTTP surface: probes, status, control API, tokens and abuse limits.

Every test talks to a real aiohttp server on a free port through a real HTTP
client; the daemon is played by ``FakeControl`` (the FleetControl protocol).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.fleet.snapshot import ControlError, ReloadResult
from supervisor.http.server import check_bind_allowed, is_loopback, readiness, run_http_server
from tests.test_http_fakes import FakeControl, HttpSettingsForTest, agent, snapshot
from tests.waiting import eventually

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serve(
    control: FakeControl, *, token: str | None = None, **settings: Any
) -> AsyncIterator[str]:
    """Run the server in a task group; yields its base URL; cancels it on exit."""
    http = HttpSettingsForTest(**settings)
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(partial(run_http_server, control, http, token=token))
        try:
            yield f"http://{host}:{port}"
        finally:
            tg.cancel_scope.cancel()


async def fetch(
    method: str, url: str, *, json_body: Any = None, data: bytes | None = None, **kw: Any
) -> tuple[int, Any]:
    """One request; a POST says ``Content-Type: application/json`` as the CLI does."""
    if method == "POST" and json_body is None:
        kw["headers"] = {"Content-Type": "application/json", **kw.get("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=json_body, data=data, **kw) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


# ----------------------------------------------------------------------------- probes


async def test_livez_answers_while_loop_runs() -> None:
    """/livez is 200 (GET and HEAD) as long as the event loop serves requests."""
    async with serve(FakeControl()) as url:
        assert await fetch("GET", url + "/livez") == (200, {"live": True})
        status, _ = await fetch("HEAD", url + "/livez")
        assert status == 200


async def test_readyz_ok_when_every_agent_ready() -> None:
    """/readyz is 200 when Redis is up and every agent has its ready replicas."""
    async with serve(FakeControl()) as url:
        assert await fetch("GET", url + "/readyz") == (200, {"ready": True, "reasons": []})


async def test_readyz_lists_every_reason() -> None:
    """/readyz is 503 with one reason per problem; stopped agents are not a problem."""
    snap = snapshot(
        agent("echo", desired=3, ready=1),
        agent("x", desired=1, ready=0, state="fatal"),
        agent("off", desired=2, ready=0, state="stopped"),
        redis_up=False,
    )
    async with serve(FakeControl(snap=snap)) as url:
        status, body = await fetch("GET", url + "/readyz")
    assert status == 503
    assert body == {
        "ready": False,
        "reasons": ["redis: connection refused", "agent echo: 1/3 ready", "agent x: fatal"],
    }


async def test_readyz_starting_before_first_plan() -> None:
    """Before the first plan is up /readyz says 'starting' (503)."""
    async with serve(FakeControl(snap=snapshot(ready=False))) as url:
        assert await fetch("GET", url + "/readyz") == (
            503,
            {"ready": False, "reasons": ["starting"]},
        )


def test_readiness_unknown_redis_error_text() -> None:
    """A Redis outage without an error text still yields a reason."""
    snap = snapshot(redis_up=False)
    snap.redis_error = None
    assert readiness(snap) == ["redis: unreachable"]


async def test_status_is_snapshot_json_without_secrets() -> None:
    """/status is the snapshot as JSON; URL passwords are redacted, env-like keys dropped."""
    snap = snapshot()
    snap.redis_url = "redis://user:hunter2@10.0.0.5:6390/0"  # a daemon bug must not leak it
    snap.agents[0].workers[0].status_text = "connected to redis://u:s3cret@db:6390"
    snap.agents[0].env = {"OPENAI_API_KEY": "sk-leak"}  # type: ignore[attr-defined]
    async with serve(FakeControl(snap=snap)) as url:
        status, body = await fetch("GET", url + "/status")
        async with aiohttp.ClientSession() as session, session.get(url + "/status") as resp:
            raw = await resp.text()
    assert status == 200
    assert body["supervisor_name"] == "test-host"
    assert body["agents"][0]["name"] == "echo"
    assert body["agents"][0]["workers"][0]["worker_id"] == "echo/0"
    assert body["agents"][0]["messages"]["processed"] == 120
    assert body["groups"][0]["lag"] is None
    assert body["redis_url"] == "redis://user:***@10.0.0.5:6390/0"
    for secret in ("hunter2", "s3cret"):
        assert secret not in raw
    # to_dict() uses dataclass fields only, so the stray attribute never appears either.
    assert "sk-leak" not in raw


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    """/metrics serves the text exposition with the ag1_ families and process metrics."""
    async with (
        serve(FakeControl()) as url,
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics") as resp,
    ):
        text = await resp.text()
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'ag1_messages_processed_total{agent="echo"} 120.0' in text
    assert 'ag1_worker_state{agent="echo",state="ready",worker="echo/0"} 1.0' in text
    assert "process_resident_memory_bytes" in text


async def test_unknown_path_and_method_are_json_errors() -> None:
    """Unknown paths give 404 and wrong methods 405 (with Allow), both as JSON."""
    async with serve(FakeControl()) as url:
        assert await fetch("GET", url + "/nope") == (404, {"error": "Not Found"})
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/reload") as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert (await resp.json())["error"] == "Method Not Allowed"


# ----------------------------------------------------------------------------- control


async def test_control_calls_reach_the_daemon() -> None:
    """Each control endpoint calls the matching FleetControl method with its arguments."""
    control = FakeControl()
    async with serve(control) as url:
        v1 = url + "/v1"
        assert await fetch("POST", v1 + "/agents/echo/restart") == (
            200,
            {"action": "restart", "agent": "echo", "ok": True},
        )
        status, _ = await fetch("POST", v1 + "/agents/echo/restart", json_body={"rolling": True})
        assert status == 200
        status, _ = await fetch("POST", v1 + "/agents/echo/scale", json_body={"replicas": 4})
        assert status == 200
        assert (await fetch("POST", v1 + "/agents/echo/stop"))[0] == 200
        assert (await fetch("POST", v1 + "/agents/echo/start"))[0] == 200
        status, body = await fetch("POST", v1 + "/reload")
    assert status == 200
    assert body["ok"] is True and body["action"] == "reload"
    assert control.calls == [
        ("restart", "echo", False),
        ("restart", "echo", True),
        ("scale", "echo", 4),
        ("stop", "echo"),
        ("start", "echo"),
        ("reload",),
    ]


async def test_control_errors_map_to_status_codes() -> None:
    """Unknown agent 404, bad bodies 400, ControlError 409; nothing reaches the daemon on 400."""
    control = FakeControl()
    async with serve(control) as url:
        v1 = url + "/v1/agents"
        status, body = await fetch("POST", v1 + "/ghost/stop")
        assert (status, body) == (404, {"error": "ghost"})
        for bad in ({}, {"replicas": -1}, {"replicas": "3"}, {"replicas": True}, {"replicas": 1.5}):
            status, body = await fetch("POST", v1 + "/echo/scale", json_body=bad)
            assert status == 400, bad
            assert "replicas" in body["error"]
        status, body = await fetch("POST", v1 + "/echo/restart", json_body={"rolling": "yes"})
        assert status == 400
        status, body = await fetch("POST", v1 + "/echo/restart", json_body={"rollin": True})
        assert (status, body["error"]) == (400, "unknown field(s): rollin")
        status, body = await fetch("POST", v1 + "/echo/stop", data=b"{not json")
        assert status == 400 and "not valid JSON" in body["error"]
        status, body = await fetch("POST", v1 + "/echo/stop", data=b"[1]")
        assert (status, body["error"]) == (400, "body must be a JSON object")
        assert control.calls == [("stop", "ghost")]
        control.fail_with = ControlError("a rolling restart of echo is already running")
        status, body = await fetch("POST", v1 + "/echo/restart", json_body={"rolling": True})
        assert (status, body) == (409, {"error": "a rolling restart of echo is already running"})


async def test_rejected_reload_is_409_with_errors() -> None:
    """A reload the daemon rejects (invalid file) answers 409 and lists the problems."""
    control = FakeControl(reload_result=ReloadResult(ok=False, errors=["agents[0].replicas: < 0"]))
    async with serve(control) as url:
        status, body = await fetch("POST", url + "/v1/reload")
    assert status == 409
    assert body["ok"] is False
    assert body["errors"] == ["agents[0].replicas: < 0"]
    assert body["error"] == "agents[0].replicas: < 0"


async def test_daemon_bug_is_500_and_server_survives() -> None:
    """An unexpected exception in a control call is a 500; the server keeps serving."""
    control = FakeControl(fail_with=RuntimeError("boom"))
    async with serve(control) as url:
        status, body = await fetch("POST", url + "/v1/agents/echo/stop")
        assert (status, body) == (500, {"error": "stop failed: boom"})
        assert (await fetch("GET", url + "/livez"))[0] == 200


@pytest.mark.timeout(20)
async def test_long_operation_is_accepted_and_finishes() -> None:
    """A control call longer than request_timeout answers 202 and still completes."""
    control = FakeControl(delay=1.0)
    async with serve(control, request_timeout=0.2) as url:
        started = time.monotonic()
        status, body = await fetch(
            "POST", url + "/v1/agents/echo/restart", json_body={"rolling": True}
        )
        assert time.monotonic() - started < 0.9
        assert status == 202
        assert body == {
            "action": "restart",
            "agent": "echo",
            "ok": True,
            "accepted": True,
            "detail": "still running; watch /status",
        }
        assert (await fetch("GET", url + "/livez"))[0] == 200
        await eventually(lambda: control.finished, timeout=5, message="restart finished")
    assert control.finished == [("restart", "echo", True)]


@pytest.mark.timeout(20)
async def test_shutdown_cancels_running_operation() -> None:
    """Cancelling the server cancels an accepted control call instead of hanging."""
    control = FakeControl(delay=60.0)
    started = time.monotonic()
    async with serve(control, request_timeout=0.1) as url:
        status, _ = await fetch("POST", url + "/v1/agents/echo/restart")
        assert status == 202
    assert time.monotonic() - started < 5
    assert control.finished == []


# ----------------------------------------------------------------------------- token


async def test_no_token_on_loopback_leaves_control_open() -> None:
    """Without a token, a loopback server accepts control calls without Authorization."""
    async with serve(FakeControl(), token=None) as url:
        assert (await fetch("POST", url + "/v1/reload"))[0] == 200


async def test_token_required_for_control_only() -> None:
    """With a token: control needs the right Bearer token (401 otherwise); GETs stay open."""
    control = FakeControl()
    async with serve(control, token="s3cret-token") as url:
        status, body = await fetch("POST", url + "/v1/reload")
        assert status == 401 and "unauthorized" in body["error"]
        for header in ("Bearer wrong", "Basic s3cret-token", "s3cret-token", "Bearer "):
            status, _ = await fetch("POST", url + "/v1/reload", headers={"Authorization": header})
            assert status == 401, header
        assert control.calls == []
        good = {"Authorization": "Bearer s3cret-token"}
        assert (await fetch("POST", url + "/v1/reload", headers=good))[0] == 200
        for path in ("/livez", "/readyz", "/status", "/metrics"):
            status, _ = await fetch("GET", url + path)
            assert status == 200, path
    assert control.calls == [("reload",)]


async def test_non_loopback_bind_without_token_refused() -> None:
    """Binding 0.0.0.0 (or any reachable address) without a token fails before listening."""
    with anyio.fail_after(5), pytest.raises(ControlError, match="AG1_CONTROL_TOKEN"):
        await run_http_server(FakeControl(), HttpSettingsForTest(host="0.0.0.0"), token=None)
    with pytest.raises(ControlError):
        check_bind_allowed("myhost.example", None)
    check_bind_allowed("::1", None)
    check_bind_allowed("localhost", None)


async def test_non_loopback_bind_with_token_allowed() -> None:
    """With a token the server may listen on all interfaces."""
    async with serve(FakeControl(), token="t", host="0.0.0.0") as url:
        port = url.rsplit(":", 1)[1]
        assert (await fetch("GET", f"http://127.0.0.1:{port}/livez"))[0] == 200


def test_is_loopback() -> None:
    """Only loopback IPs and 'localhost' count as loopback; '' means all interfaces."""
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")
    assert not is_loopback("10.1.2.3") and not is_loopback("example.com")


# ----------------------------------------------------------------------------- abuse


async def test_body_size_limit() -> None:
    """A body larger than max_body is refused with 413 and never reaches the daemon."""
    control = FakeControl()
    async with serve(control, max_body=1024) as url:
        status, body = await fetch("POST", url + "/v1/reload", data=b"x" * 5000)
        assert status == 413
        assert "Too Large" in body["error"]
        assert (await fetch("POST", url + "/v1/reload", data=b"{}"))[0] == 200
    assert control.calls == [("reload",)]


def _raw_connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


@pytest.mark.timeout(20)
async def test_slow_body_times_out_and_does_not_stall_probes() -> None:
    """A client trickling its body gets 408 after request_timeout; probes stay fast meanwhile."""
    control = FakeControl()
    async with serve(control, request_timeout=0.5) as url:
        sock = _raw_connect(url)
        try:
            sock.sendall(
                b"POST /v1/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            started = time.monotonic()
            assert (await fetch("GET", url + "/livez"))[0] == 200
            assert time.monotonic() - started < 0.4
            reply = await anyio.to_thread.run_sync(sock.recv, 4096)
        finally:
            sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert control.calls == []


@pytest.mark.timeout(20)
async def test_half_sent_headers_connection_is_closed() -> None:
    """A connection that never finishes its request line/headers is closed after the timeout."""
    async with serve(FakeControl(), request_timeout=0.5) as url:
        sock = _raw_connect(url)
        try:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no final blank line
            started = time.monotonic()
            assert (await fetch("GET", url + "/livez"))[0] == 200
            data = await anyio.to_thread.run_sync(sock.recv, 4096)
            elapsed = time.monotonic() - started
        finally:
            sock.close()
    assert data == b""  # closed by the server
    assert elapsed < 5


# ----------------------------------------------------------------------------- lifecycle


async def test_cancel_stops_listening() -> None:
    """Cancelling run_http_server closes the listening socket."""
    async with serve(FakeControl()) as url:
        assert (await fetch("GET", url + "/livez"))[0] == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch("GET", url + "/livez")


async def test_port_in_use_is_a_clear_error() -> None:
    """A port already taken raises ControlError naming the address."""
    async with serve(FakeControl()) as url:
        port = int(url.rsplit(":", 1)[1])
        with (
            anyio.fail_after(5),
            pytest.raises(ControlError, match=f"cannot listen on 127.0.0.1:{port}: Address al"),
        ):
            await run_http_server(FakeControl(), HttpSettingsForTest(port=port), token=None)


async def test_disabled_http_reports_none() -> None:
    """With [http] enabled = false the server reports None and returns at once."""
    async with anyio.create_task_group() as tg:
        result = await tg.start(
            partial(run_http_server, FakeControl(), HttpSettingsForTest(enabled=False), token=None)
        )
    assert result is None


def test_status_json_matches_snapshot_to_dict() -> None:
    """/status serialises exactly what FleetSnapshot.to_dict() holds (without secrets)."""
    from supervisor.http.server import scrub

    snap = snapshot(agent("a", 3), agent("b", desired=2, ready=1, state="degraded"))
    assert scrub(snap) == snap.to_dict()


async def test_operation_cancelled_by_shutdown_is_reported() -> None:
    """A control call cut short because the server is stopping is an error, not a success."""
    from supervisor.http.server import Operations

    async def slow() -> None:
        await anyio.sleep(30)

    async with anyio.create_task_group() as tg:
        ops = Operations(tg)
        tg.cancel_scope.cancel()
        with (
            anyio.CancelScope(shield=True),
            anyio.fail_after(5),
            pytest.raises(ControlError, match="the supervisor is stopping"),
        ):
            await ops.run("restart echo", slow, 5)


@asynccontextmanager
async def serve_app(control: FakeControl, **kw: Any) -> AsyncIterator[str]:
    """Serve build_app() directly (for options run_http_server does not expose)."""
    from aiohttp import web

    from supervisor.http.server import build_app

    app = build_app(control, token=None, max_body=65536, request_timeout=5.0, **kw)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class CountingControl(FakeControl):
    snapshots = 0

    def snapshot(self) -> Any:
        self.snapshots += 1
        return super().snapshot()


async def test_probes_share_one_snapshot_within_ttl() -> None:
    """/readyz and /status reuse one snapshot for snapshot_ttl; after it a fresh one is taken."""
    control = CountingControl()
    async with serve_app(control, snapshot_ttl=60.0) as url:
        for path in ("/status", "/readyz", "/status", "/readyz"):
            assert (await fetch("GET", url + path))[0] == 200
        assert control.snapshots == 1
    control = CountingControl()
    async with serve_app(control, snapshot_ttl=0.0) as url:
        for path in ("/status", "/readyz", "/status"):
            await fetch("GET", url + path)
        assert control.snapshots == 3


async def test_control_call_drops_cached_snapshot() -> None:
    """A status read after a control answer sees the call's effect, whatever the TTL."""
    control = CountingControl()
    async with serve_app(control, snapshot_ttl=60.0) as url:
        assert (await fetch("GET", url + "/status"))[1]["agents"][0]["desired_replicas"] == 2
        control.snap = snapshot(agent("echo", desired=5))  # what the daemon shows after scaling
        status, _ = await fetch("POST", url + "/v1/agents/echo/scale", json_body={"replicas": 5})
        assert status == 200
        assert (await fetch("GET", url + "/status"))[1]["agents"][0]["desired_replicas"] == 5
