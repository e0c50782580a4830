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
binding a non-loopback address without one is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
from aiohttp import web

from core_bus.log import get_logger
from core_bus.settings import redact_url
from supervisor.metrics import build_registry, render
from supervisor.snapshot import (
    ControlError,
    FleetControl,
    FleetSnapshot,
    ReloadResult,
    UnknownAgentError,
)

log = get_logger("supervisor.http")

#: Keys never shown by ``/status`` even if a future snapshot grows them.
SECRET_KEYS = frozenset({"env", "environment", "password", "token", "secret", "secrets"})

#: ``scheme://user:PASSWORD@`` anywhere in a string (worker status lines, errors).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(@)")

Operation = Callable[[], Awaitable[Any]]


class HttpSettings(Protocol):
    """The ``[http]`` section as this module needs it (``supervisor.config.HttpConfig``)."""

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


class BadRequest(ValueError):
    """The request body is not what the endpoint accepts (400)."""


# --------------------------------------------------------------------------- helpers


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


def readiness(snap: FleetSnapshot) -> list[str]:
    """Reasons the fleet is not ready; empty when it is."""
    if not snap.ready:
        return ["starting"]
    reasons: list[str] = []
    if not snap.redis_up:
        reasons.append(f"redis: {snap.redis_error or 'unreachable'}")
    for agent in snap.agents:
        if agent.state == "stopped":
            continue  # stopped on purpose by an operator
        if agent.state == "fatal":
            reasons.append(f"agent {agent.name}: fatal")
        elif agent.ready_replicas < agent.desired_replicas:
            reasons.append(
                f"agent {agent.name}: {agent.ready_replicas}/{agent.desired_replicas} ready"
            )
    return reasons


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str, separators=(",", ":"))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


# --------------------------------------------------------------------------- operations


class Operations:
    """Runs control calls; ones outlasting ``timeout`` continue in a task group.

    Without a task group (``build_app`` used alone) a call is simply awaited
    to the end, so a long call holds the request open.
    """

    def __init__(self, task_group: anyio.abc.TaskGroup | None = None) -> None:
        self.task_group = task_group

    async def run(self, name: str, op: Operation, wait_seconds: float) -> tuple[bool, Any]:
        """``(True, result)`` if done within ``wait_seconds``, else ``(False, None)``.

        Exceptions of a call that finished in time are re-raised here.
        """
        if self.task_group is None:
            return True, await op()
        done = anyio.Event()
        outcome: dict[str, Any] = {}

        async def runner() -> None:
            try:
                outcome["result"] = await op()
            except anyio.get_cancelled_exc_class():
                outcome["error"] = ControlError(f"{name}: cancelled, the supervisor is stopping")
                raise
            except Exception as exc:  # reported to the waiter, or logged below
                outcome["error"] = exc
            finally:
                done.set()
            if outcome.get("abandoned"):  # the client already got 202: log the end
                if "error" in outcome:
                    log.error("control_failed", operation=name, error=str(outcome["error"]))
                else:
                    log.info("control_done", operation=name, late=True)

        self.task_group.start_soon(runner, name=f"control {name}")
        with anyio.move_on_after(wait_seconds):
            await done.wait()
        if not done.is_set():
            outcome["abandoned"] = True
            log.info("control_accepted", operation=name, waited=wait_seconds)
            return False, None
        if "error" in outcome:
            raise outcome["error"]
        return True, outcome.get("result")


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

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON object body ({} when empty); 408 for a slow sender, 413 when too big."""
        try:
            with anyio.fail_after(self.request_timeout):
                raw = await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=json.dumps({"error": "request body not received in time"}),
                content_type="application/json",
            ) from None
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        return data

    async def _control(
        self, request: web.Request, action: str, call: Callable[[dict[str, Any]], Operation]
    ) -> web.Response:
        agent = request.match_info.get("name")
        if not self._authorized(request):
            log.warning("control_unauthorized", action=action, agent=agent, peer=request.remote)
            resp = _error(401, "unauthorized: send Authorization: Bearer <AG1_CONTROL_TOKEN>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="ag1-fleet"'
            return resp
        started = time.monotonic()
        try:
            op = call(await self._body(request))
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
        return _json(base)

    async def restart(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            rolling = body.get("rolling", False)
            if not isinstance(rolling, bool):
                raise BadRequest('"rolling" must be true or false')
            _no_extra(body, {"rolling"})
            return lambda: self.control.restart_agent(name, rolling=rolling)

        return await self._control(request, "restart", call)

    async def scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            replicas = body.get("replicas")
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                raise BadRequest('"replicas" must be an integer >= 0')
            _no_extra(body, {"replicas"})
            return lambda: self.control.scale_agent(name, replicas)

        return await self._control(request, "scale", call)

    async def stop(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            _no_extra(body, set())
            return lambda: self.control.stop_agent(name)

        return await self._control(request, "stop", call)

    async def start(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def call(body: dict[str, Any]) -> Operation:
            _no_extra(body, set())
            return lambda: self.control.start_agent(name)

        return await self._control(request, "start", call)

    async def reload(self, request: web.Request) -> web.Response:
        def call(body: dict[str, Any]) -> Operation:
            _no_extra(body, set())
            return self.control.reload

        return await self._control(request, "reload", call)


def _no_extra(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}")


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


def build_app(
    control: FleetControl,
    *,
    token: str | None,
    max_body: int,
    request_timeout: float,
    operations: Operations | None = None,
    snapshot_ttl: float = 0.1,
) -> web.Application:
    """The aiohttp application (tests may serve it themselves).

    ``snapshot_ttl``: how long ``/readyz`` and ``/status`` reuse one snapshot.
    """
    app = web.Application(client_max_size=max_body, middlewares=[_json_errors])
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
        ]
    )
    return app


async def run_http_server(
    control: FleetControl,
    http: HttpSettings,
    *,
    token: str | None,
    task_status: anyio.abc.TaskStatus[tuple[str, int] | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound ``(host, port)`` through ``task_status``.

    Raises :class:`ControlError` before binding when a non-loopback address
    would serve the control API without a token, or when the address cannot
    be bound. With ``http.enabled`` false it reports ``None`` and returns.
    """
    if not http.enabled:
        task_status.started(None)
        return
    check_bind_allowed(http.host, token)
    operations = Operations()
    app = build_app(
        control,
        token=token,
        max_body=http.max_body,
        request_timeout=http.request_timeout,
        operations=operations,
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
        site = web.TCPSite(runner, http.host, http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ControlError(f"cannot listen on {http.host}:{http.port}: {reason}") from exc
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
