"""The control API's fleet-wide parts: body checks and replies for ``/v1/fleet`` and
``POST /v1/agents/{name}/restart`` with ``"fleet": true`` (routes live in ``http.server``).
"""

from __future__ import annotations

from typing import Any

import anyio

from core_bus.log import get_logger
from core_bus.streams.errors import is_transient
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.service import DEFAULT_HOST_TIMEOUT, FleetCommands
from supervisor.http.control import BadRequest, Operation, no_extra

log = get_logger("supervisor.http")

#: Fields a fleet restart body may carry.
FLEET_RESTART_FIELDS = {"rolling", "fleet", "timeout"}


def fleet_restart_call(fleet: FleetCommands | None, agent: str, body: dict[str, Any]) -> Operation:
    """``{"fleet": true, "rolling": true, "timeout": 120}`` -> the operation to run.

    :raises BadRequest: a field is of the wrong type or unknown.
    """
    if body.get("fleet") is not True:
        raise BadRequest('"fleet" must be true or false')
    rolling = body.get("rolling", False)
    timeout = body.get("timeout", DEFAULT_HOST_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise BadRequest('"timeout" must be a number of seconds in (0, 3600]')
    no_extra(body, FLEET_RESTART_FIELDS)

    async def run() -> dict[str, Any]:
        if fleet is None:
            raise ControlError("fleet control is not available (no Redis client yet)")
        return await fleet.restart(agent, rolling=bool(rolling), host_timeout=float(timeout))

    return run


async def fleet_view_reply(
    fleet: FleetCommands | None, seconds: float
) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` for ``GET /v1/fleet``: 200, 404 without fleet support, 503 when
    Redis does not answer within ``seconds``."""
    if fleet is None:
        return 404, {"error": "this supervisor has no fleet view (no Redis client yet)"}
    try:
        with anyio.fail_after(seconds):
            return 200, await fleet.view()
    except TimeoutError:
        return 503, {"error": f"redis did not answer within {seconds:g}s"}
    except Exception as exc:
        if not is_transient(exc):
            log.exception("fleet_view_failed")
        return 503, {"error": f"cannot read the fleet from redis: {type(exc).__name__}: {exc}"}
