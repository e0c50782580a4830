"""Noticing that a program closed its Redis client under a running subscription.

``subscribe()`` returns at once and consumes in the background (the
prototype's version never returned), so a prototype script that does
``await subscribe(redis, ...)`` and then ``await redis.aclose()`` ends before
its subscription did anything. That is reported once per client, as exactly
that, with the fix, instead of as a lost connection: the client's ``aclose``
(which ``close()`` and ``async with`` call too) is wrapped on the instance
the first time a handle-returning call gets it. The subscriptions on it are
then stopped: reconnecting a client its owner closed would only hide the bug.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from typing import Any

import anyio

from core_bus.log import get_logger

#: How long closing the client waits for the subscriptions on it to end.
STOP_WAIT_SECONDS = 2.0

FIX = (
    "subscribe() returns at once and consumes in the background: keep the program "
    "running with `await sub.wait()` (or `async with subscription(redis, stream, handler, "
    "group):` from core_bus.bus) and close the client after that"
)

_watched: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def watch_client(redis: Any, handle: Any) -> None:
    """Report (once) if ``redis`` is closed while ``handle`` still runs."""
    try:
        handles = _watched.get(redis)
    except TypeError:  # not weak-referenceable: nothing to watch
        return
    if handles is None:
        if not _wrap_close(redis):
            return
        handles = _watched[redis] = weakref.WeakSet()
    handles.add(handle)


def _wrap_close(redis: Any) -> bool:
    original = getattr(redis, "aclose", None)
    if original is None:
        return False

    async def aclose(*args: Any, **kwargs: Any) -> Any:
        if _called_by_redis_py():
            # redis-py's RedisCluster closes itself after a connection error and
            # reopens on its next command (a failover): that is not its owner closing.
            return await original(*args, **kwargs)
        stopping = _closing(redis, report=not _shutting_down())
        if stopping:
            # Let them end before the pool goes (a script ending right after this
            # would otherwise leave never-started tasks behind).
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT_SECONDS):
                for handle in stopping:
                    await handle._done_event.wait()
        return await original(*args, **kwargs)

    try:
        redis.aclose = aclose
    except AttributeError:
        return False
    return True


def _called_by_redis_py() -> bool:
    """True when the ``aclose`` call comes from inside the redis package itself."""
    caller = sys._getframe(2)  # 0: here, 1: the wrapper, 2: whoever called aclose
    return str(caller.f_globals.get("__name__", "")).startswith("redis.")


def _shutting_down() -> bool:
    """Closing in a cancelled task (Ctrl-C, a ``finally``): stopping, not a mistake."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() > 0


def _closing(redis: Any, *, report: bool) -> list[Any]:
    """Report (unless ``report`` is false) and stop the live subscriptions on ``redis``."""
    handles = _watched.get(redis)
    live = [h for h in list(handles or ()) if h.running]
    if handles is not None:
        handles.clear()
    if not live:
        return []
    if report:
        streams = sorted({s for h in live for s in _streams_of(h)})
        get_logger("core_bus.subscription").warning(
            "redis_client_closed_under_subscription",
            subscriptions=len(live),
            streams=",".join(streams) or None,
            fix=FIX,
        )
    for handle in live:
        _silence(handle)
        handle._drain_timeout = 0.0
        handle._stopping = True
        handle._request_stop()
    return live


def _streams_of(handle: Any) -> list[str]:
    streams = getattr(handle, "streams", None)
    if isinstance(streams, list) and streams:
        return [str(s) for s in streams]
    return [str(p) for p in getattr(handle, "patterns", ())]


def _silence(handle: Any) -> None:
    """No ``connection_lost`` for the connections the owner just closed."""
    watch = getattr(handle, "_watch", None)
    if watch is not None:
        watch.silenced = True
    for child in list(getattr(handle, "subscriptions", {}).values()):
        _silence(child)
    inner = getattr(handle, "subscription", None)
    if inner is not None:
        _silence(inner)
