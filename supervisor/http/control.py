"""Running control calls for the HTTP server: request limits, body checks, the 202 runner.

A control call waits at most ``request_timeout``; a longer one (a rolling
restart) keeps running in the server's task group and the client gets
``202 Accepted``. Bodies are read under the same deadline (408 for a slow
sender) and must be a JSON object with only the fields the endpoint knows.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from aiohttp import web

from core_bus.log import get_logger
from supervisor.fleet.snapshot import ControlError

log = get_logger("supervisor.http")

Operation = Callable[[], Awaitable[Any]]


class BadRequest(ValueError):
    """The request body is not what the endpoint accepts (400)."""


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


async def read_json_object(request: web.Request, seconds: float) -> dict[str, Any]:
    """The JSON object body ({} when empty); 408 past ``seconds``, 400 for a non-object.

    A body over ``client_max_size`` is refused by aiohttp itself (413).
    """
    try:
        with anyio.fail_after(seconds):
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
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many int digits
        raise BadRequest(f"body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def no_extra(body: dict[str, Any], allowed: set[str]) -> None:
    """Raise :class:`BadRequest` naming fields outside ``allowed``."""
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}")
