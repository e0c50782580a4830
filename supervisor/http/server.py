"""Health probes, status, metrics and the control API over HTTP (aiohttp).

The server only talks to the daemon through :class:`FleetControl`: GETs read a
snapshot, POSTs call one control method. It runs inside the daemon's event
loop, so it must never stall it:

* bodies are capped (``client_max_size = max_body``; 413 beyond),
* reading a body is bounded by ``request_timeout`` (408 for a slow sender),
* a connection that does not complete a request within ``request_timeout`` is
  closed (aiohttp's keep-alive timer also covers half-sent headers),
* a control call waits at most ``request_timeout``; a longer one (a rolling
  restart) keeps running in the server's task group and the client gets
  ``202 Accepted`` — progress is visible in ``/status``.

Control endpoints need ``Authorization: Bearer <token>`` when a token is set;
binding a non-loopback address without one is refused. Every request must
name a loopback or allowed ``Host``, come from this server's own ``Origin`` if
it has one, and a POST must be ``application/json``; anything else gets 403
and one ``http_refused`` log event (:class:`~supervisor.http.security.RequestGuard`).

One job in one file (just over ~400 lines): the route table and its handlers;
limits are :mod:`supervisor.http.control`, auth rules :mod:`supervisor.http.security`.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Protocol

import anyio
import anyio.abc
from aiohttp import web

from core_bus.log import get_logger
from core_bus.settings import redact_url
from supervisor.fleet.snapshot import (
    ControlError,
    FleetControl,
    FleetSnapshot,
    ReloadResult,
    UnknownAgentError,
)
from supervisor.fleetctl.http import fleet_restart_call, fleet_view_reply
from supervisor.fleetctl.service import FleetCommands
from supervisor.http.control import (
    BadRequest,
    Operation,
    Operations,
    no_extra,
    read_json_object,
)
from supervisor.http.listen import bind_http
from supervisor.http.metrics import build_registry, render
from supervisor.http.security import (
    SECRET_KEYS,
    RequestGuard,
    bearer_authorized,
    check_bind_allowed,
    is_loopback,
    scrub,
)

log = get_logger("supervisor.http")


class HttpSettings(Protocol):
    """The ``[http]`` section as this module needs it (``supervisor.config.models.HttpConfig``)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def request_timeout(self) -> float: ...
    @property
    def max_body(self) -> int: ...
    @property
    def allowed_hosts(self) -> list[str]: ...


# --------------------------------------------------------------------------- helpers


def readiness(snap: FleetSnapshot) -> list[str]:
    """Reasons the fleet is not ready; empty when it is (Redis first: it explains the rest)."""
    reasons: list[str] = []
    if not snap.redis_up:
        reasons.append(f"redis: {snap.redis_error or 'unreachable'}")
    if not snap.ready:
        return [*reasons, "starting"]
    for agent in snap.agents:
        if agent.state == "stopped":
            continue  # stopped on purpose by an operator
        if agent.state == "fatal":
            reasons.append(f"agent {agent.name}: fatal")
        elif agent.ready_replicas < agent.desired_replicas:
            reasons.append(
                f"agent {agent.name}: {agent.ready_replicas}/{agent.desired_replicas} ready"
            )
        elif agent.state == "degraded":  # all up, none making progress (hung handlers)
            reasons.append(f"agent {agent.name}: degraded: {agent.last_error}")
    return reasons


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


# --------------------------------------------------------------------------- app


class _Handlers:
    """Request handlers; plain methods bound to one control object."""

    def __init__(
        self,
        control: FleetControl,
        *,
        token: str | None,
        request_timeout: float,
        operations: Operations,
        snapshot_ttl: float = 0.1,
    ) -> None:
        self.control = control
        self.token = token
        self.request_timeout = request_timeout
        self.operations = operations
        self.snapshot_ttl = snapshot_ttl
        self.registry = build_registry(control.snapshot)
        self._snap: FleetSnapshot | None = None
        self._snap_at = 0.0
        self._status_body: bytes | None = None

    def snapshot(self) -> FleetSnapshot:
        """The daemon's snapshot, reused for ``snapshot_ttl`` seconds.

        Probes may arrive hundreds of times a second; one snapshot (and one
        ``/status`` body) per 100 ms keeps their cost flat. Control calls
        through this server drop the cached one, so a status read after a
        control answer always sees its effect.
        """
        now = time.monotonic()
        if self._snap is None or now - self._snap_at >= self.snapshot_ttl:
            self._snap = self.control.snapshot()
            self._snap_at = now
            self._status_body = None
        return self._snap

    def invalidate(self) -> None:
        self._snap = None
        self._status_body = None

    async def livez(self, request: web.Request) -> web.Response:
        # Answering at all proves the supervisor's event loop is turning.
        return _json({"live": True})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = readiness(self.snapshot())
        if reasons:
            return _json({"ready": False, "reasons": reasons}, status=503)
        return _json({"ready": True, "reasons": []})

    async def status(self, request: web.Request) -> web.Response:
        snap = self.snapshot()
        if self._status_body is None:
            data = scrub(snap)
            data["redis_url"] = redact_url(str(data.get("redis_url", "")))
            self._status_body = _dumps(data).encode()
        return web.Response(body=self._status_body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = render(self.registry, request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    # ----- control

    async def _control(
        self, request: web.Request, action: str, call: Callable[[dict[str, Any]], Operation]
    ) -> web.Response:
        agent = request.match_info.get("name")
        if not bearer_authorized(request.headers.get("Authorization", ""), self.token):
            log.warning("control_unauthorized", action=action, agent=agent, peer=request.remote)
            resp = _error(401, "unauthorized: send Authorization: Bearer <AG1_CONTROL_TOKEN>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="ag1-fleet"'
            return resp
        started = time.monotonic()
        try:
            op = call(await read_json_object(request, self.request_timeout))
            done, result = await self.operations.run(
                f"{action} {agent or ''}".strip(), op, self.request_timeout
            )
        except BadRequest as exc:
            return _error(400, str(exc))
        except UnknownAgentError as exc:
            return _error(404, _message(exc, f"unknown agent: {agent}"))
        except ControlError as exc:
            return _error(409, str(exc))
        except web.HTTPException:
            raise
        except Exception as exc:  # a daemon bug must not kill the server
            log.exception("control_error", action=action, agent=agent)
            return _error(500, f"{action} failed: {exc}")
        finally:
            self.invalidate()  # the next status read sees the call's effect
        base: dict[str, Any] = {"action": action}
        if agent is not None:
            base["agent"] = agent
        if not done:
            base.update(ok=True, accepted=True, detail="still running; watch /status")
            return _json(base, status=202)
        log.info(
            "control_done",
            action=action,
            agent=agent,
            seconds=round(time.monotonic() - started, 3),
        )
        if isinstance(result, ReloadResult):
            base.update(asdict(result))
            if not result.ok:
                base["error"] = "; ".join(result.errors) or "reload rejected"
                return _json(base, status=409)
            return _json(base)
        base["ok"] = True
        if isinstance(result, dict):  # a fleet restart: each host's outcome
            base.update(result)
        return _json(base)

    async def restart(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            rolling = body.get("rolling", False)
            if not isinstance(rolling, bool):
                raise BadRequest('"rolling" must be true or false')
            if body.get("fleet", False) is not False:
                return fleet_restart_call(self._fleet(), name, body)
            no_extra(body, {"rolling", "fleet"})
            return lambda: self.control.restart_agent(name, rolling=rolling)

        return await self._control(request, "restart", call)

    async def scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            replicas = body.get("replicas")
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                raise BadRequest('"replicas" must be an integer >= 0')
            no_extra(body, {"replicas"})
            return lambda: self.control.scale_agent(name, replicas)

        return await self._control(request, "scale", call)

    async def stop(self, request: web.Request) -> web.Response:
        return await self._agent_call(request, "stop", self.control.stop_agent)

    async def start(self, request: web.Request) -> web.Response:
        return await self._agent_call(request, "start", self.control.start_agent)

    async def _agent_call(
        self,
        request: web.Request,
        action: str,
        method: Callable[[str], Awaitable[Any]],
    ) -> web.Response:
        """An agent action that takes no body fields."""
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            no_extra(body, set())
            return lambda: method(name)

        return await self._control(request, action, call)

    def _fleet(self) -> FleetCommands | None:
        fleet = getattr(self.control, "fleet", None)
        return fleet if isinstance(fleet, FleetCommands) else None

    async def fleet(self, request: web.Request) -> web.Response:
        """``GET /v1/fleet``: every supervisor of the fleet (token required when set)."""
        if not bearer_authorized(request.headers.get("Authorization", ""), self.token):
            log.warning("control_unauthorized", action="fleet", peer=request.remote)
            resp = _error(401, "unauthorized: send Authorization: Bearer <AG1_CONTROL_TOKEN>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="ag1-fleet"'
            return resp
        status, data = await fleet_view_reply(self._fleet(), self.request_timeout)
        return _json(data, status=status)

    async def reload(self, request: web.Request) -> web.Response:
        def call(body: dict[str, Any]) -> Operation:
            no_extra(body, set())
            return self.control.reload

        return await self._control(request, "reload", call)


def _message(exc: BaseException, default: str) -> str:
    text = str(exc.args[0]) if exc.args else ""
    return text or default


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (404, 405, 413) into JSON bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        resp = _error(exc.status, exc.reason)
        for name, value in exc.headers.items():
            if name.lower() not in {"content-type", "content-length"}:
                resp.headers[name] = value
        return resp


def _guard_middleware(guard: RequestGuard) -> Any:
    @web.middleware
    async def _guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """403 for a foreign Host or Origin, or a POST that is not JSON (see security)."""
        reason = guard.refusal(
            request.method,
            request.headers.get("Host"),
            request.headers.get("Origin"),
            request.headers.get("Content-Type", ""),
        )
        if reason is None:
            return await handler(request)
        log.warning(
            "http_refused",
            reason=reason,
            method=request.method,
            path=request.path[:200],
            peer=request.remote,
        )
        return _error(403, f"forbidden: {reason}")

    return _guard


def build_app(
    control: FleetControl,
    *,
    token: str | None,
    max_body: int,
    request_timeout: float,
    operations: Operations | None = None,
    snapshot_ttl: float = 0.1,
    guard: RequestGuard | None = None,
) -> web.Application:
    """The aiohttp application (tests may serve it themselves).

    ``snapshot_ttl``: how long ``/readyz`` and ``/status`` reuse one snapshot.
    ``guard``: Host/Origin/Content-Type rules (default: loopback names only).
    """
    app = web.Application(
        client_max_size=max_body,
        middlewares=[_guard_middleware(guard or RequestGuard("127.0.0.1")), _json_errors],
    )
    h = _Handlers(
        control,
        token=token or None,
        request_timeout=request_timeout,
        operations=operations or Operations(),
        snapshot_ttl=snapshot_ttl,
    )
    app.add_routes(
        [
            web.get("/livez", h.livez, allow_head=True),
            web.get("/readyz", h.readyz, allow_head=True),
            web.get("/status", h.status),
            web.get("/metrics", h.metrics),
            web.post("/v1/agents/{name}/restart", h.restart),
            web.post("/v1/agents/{name}/scale", h.scale),
            web.post("/v1/agents/{name}/stop", h.stop),
            web.post("/v1/agents/{name}/start", h.start),
            web.post("/v1/reload", h.reload),
            web.get("/v1/fleet", h.fleet),
        ]
    )
    return app


async def run_http_server(
    control: FleetControl,
    http: HttpSettings,
    *,
    token: str | None,
    sockets: list[socket.socket] | None = None,
    task_status: anyio.abc.TaskStatus[tuple[str, int] | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound ``(host, port)`` through ``task_status``.

    ``sockets`` are already bound (:func:`~supervisor.http.listen.bind_http`, which
    the daemon calls before it starts anything); without them they are bound here.
    Raises :class:`ControlError` before listening when a non-loopback address
    would serve the control API without a token, or when the address cannot
    be bound. With ``http.enabled`` false it reports ``None`` and returns.
    """
    if not http.enabled:
        task_status.started(None)
        return
    if sockets is None:
        sockets = bind_http(http, token)
    operations = Operations()
    app = build_app(
        control,
        token=token,
        max_body=http.max_body,
        request_timeout=http.request_timeout,
        operations=operations,
        guard=RequestGuard(http.host, list(http.allowed_hosts)),
    )
    runner = web.AppRunner(
        app,
        access_log=None,  # probes every few seconds would flood the log
        handle_signals=False,  # the daemon owns signals
        keepalive_timeout=max(float(http.request_timeout), 1.0),
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        host, port = runner.addresses[0][:2]
        log.info("http_listening", host=host, port=port, auth=bool(token))
        async with anyio.create_task_group() as tg:
            operations.task_group = tg
            task_status.started((str(host), int(port)))
            try:
                await anyio.sleep_forever()
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


__all__ = [
    "SECRET_KEYS",
    "BadRequest",
    "HttpSettings",
    "Operation",
    "Operations",
    "build_app",
    "check_bind_allowed",
    "is_loopback",
    "readiness",
    "run_http_server",
    "scrub",
]
