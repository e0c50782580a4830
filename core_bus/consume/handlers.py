"""Handler shapes a subscription accepts: ``async def h(env)`` or ``async def h(env, redis)``."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[..., Awaitable[Any]]


def _is_async_callable(handler: Any) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def handler_arity(handler: Any) -> int:
    """How many positional arguments to pass: 1 (``env``) or 2 (``env, redis``).

    Raises :class:`TypeError` for anything that is not an async callable taking
    one or two positional arguments (checked once, at subscribe time, so a wrong
    handler fails loudly instead of on the first message).
    """
    if not callable(handler) or not _is_async_callable(handler):
        raise TypeError(f"handler must be an async callable (async def), got {handler!r}")
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot inspect handler {handler!r}: {exc}") from exc
    positional: list[inspect.Parameter] = []
    var_positional = False
    for param in sig.parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional.append(param)
        elif param.kind is param.VAR_POSITIONAL:
            var_positional = True
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            raise TypeError(f"handler {handler!r} has a required keyword-only argument")
    required = sum(1 for p in positional if p.default is p.empty)
    if required > 2:
        raise TypeError(f"handler {handler!r} must take (env) or (env, redis), not {sig}")
    if required == 2:
        return 2
    if not positional and not var_positional:
        raise TypeError(f"handler {handler!r} must take (env) or (env, redis), not {sig}")
    if len(positional) >= 2 and positional[1].name == "redis":
        return 2
    return 1
