"""One handle type for every kind of subscription: plain, ordered and discovery.

A subscription is a long-running body (:meth:`SubscriptionHandle._serve`) with
one surface, whoever owns its task:

* structured: ``await tg.start(sub.run)`` in the caller's task group
  (returns once started; the task ends when stopped and raises a fatal error
  into that group), or ``async with sub:`` (started on entry, stopped and
  drained on exit, a fatal error re-raised there);
* handle-returning calls (:func:`core_bus.subscribe`,
  :func:`core_bus.discovery.start_bus_subscriptions`, ...): the body runs in
  the event loop's *background host*, itself one task group, which owns
  every such subscription, keeps it alive while a caller drops the handle (as
  the prototype's ``dynamic_subscribe`` does) and stores its error on the
  handle (``started()``, ``wait()``, ``stop()`` re-raise it), so nothing is
  ever logged as "Task exception was never retrieved".

Concurrency primitives are anyio's throughout (events, task groups, cancel
scopes, ``move_on_after``) on the asyncio loop the caller runs; asyncio is used
directly only for the host task itself and for locks/events on hot paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from core_bus.errors import BusError


class SubscriptionHandle:
    """Start/stop surface shared by :class:`~core_bus.consume.subscription.Subscription`,
    :class:`~core_bus.ordered.OrderedSubscription` and
    :class:`~core_bus.discovery.BusSubscriptions`."""

    #: Seconds :meth:`stop` waits for running handlers when called without a value.
    default_drain_timeout = 10.0

    def __init__(self) -> None:
        self._started_event = anyio.Event()
        self._done_event = anyio.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._claimed = False
        self._drain_timeout = self.default_drain_timeout
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- the body, implemented by each kind -------------------------------------------
    async def _serve(self) -> None:
        """Run until stopped; call :meth:`_mark_started` once consuming."""
        raise NotImplementedError

    def _request_stop(self) -> None:
        """Ask the body to stop (drain with ``self._drain_timeout``); idempotent."""
        raise NotImplementedError

    def _log_failure(self, error: BaseException) -> None:
        """Log a fatal error once (each kind names its event)."""

    # -- public surface ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True from start until stop() is called or the subscription failed."""
        return self._claimed and not self._done_event.is_set() and not self._stopping

    @property
    def error(self) -> BaseException | None:
        """The error that ended the subscription, if any."""
        return self._error

    async def started(self) -> None:
        """Return once consuming; raise the error if it failed first."""
        await self._started_event.wait()
        if self._error is not None:
            raise self._error
        if self._done_event.is_set() and not self._stopping:
            raise BusError("subscription ended before it started")

    async def wait(self) -> None:
        """Wait until stopped or failed; re-raises a fatal error."""
        await self._done_event.wait()
        if self._error is not None:
            raise self._error

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop reading, let running handlers finish (up to ``drain_timeout``), flush acks.

        Entries not finished by then stay pending (and are reclaimed by
        siblings). Re-raises a fatal error the subscription had hit.
        """
        if not self._claimed:
            return
        if not self._stopping:
            if drain_timeout is not None:
                self._drain_timeout = drain_timeout
            self._stopping = True
            self._request_stop()
        await self.wait()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run in the caller's task: ``await tg.start(sub.run)``. Raises a fatal error."""
        self._claim()
        self._task_status = task_status
        await self._serve_to_end()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Self:
        if self._claimed:  # already running (a handle-returning call started it)
            return self
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group = group
        try:
            await group.start(self.run)
        except BaseException as exc:
            self._task_group = None
            await group.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        group, self._task_group = self._task_group, None
        try:
            with anyio.CancelScope(shield=exc is not None):
                await self._stop_quietly()
        finally:
            if group is not None:
                await group.__aexit__(exc_type, exc, tb)
        if exc is None and self._error is not None:
            raise self._error
        return None

    # -- internals --------------------------------------------------------------------
    def _mark_started(self) -> None:
        if not self._started_event.is_set():
            self._started_event.set()
            status = getattr(self, "_task_status", None)
            if status is not None:
                status.started()

    def _claim(self) -> None:
        if self._claimed:
            raise RuntimeError("this subscription is already running")
        self._claimed = True

    def _start_background(self) -> None:
        """Run in the event loop's background host (the handle-returning calls)."""
        self._claim()
        _host().submit(self)

    async def _serve_to_end(self) -> None:
        """Run the body; a fatal error is logged once and kept on the handle."""
        registry().add(self)
        try:
            await self._serve()
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self._error = _unwrap(exc)
            self._log_failure(self._error)
        finally:
            self._started_event.set()
            self._done_event.set()

    async def _stop_quietly(self, drain_timeout: float | None = None) -> None:
        with contextlib.suppress(Exception):  # the error stays on the handle
            await self.stop(drain_timeout)


class _BackgroundHost:
    """One task group per event loop that owns the handle-returning subscriptions."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: deque[SubscriptionHandle] = deque()
        self._wake = asyncio.Event()
        self.handles: set[SubscriptionHandle] = set()  # strong: callers may drop theirs
        self.registry: weakref.WeakSet[SubscriptionHandle] = weakref.WeakSet()
        self._task = loop.create_task(self._main(), name="core_bus:subscriptions")

    def submit(self, handle: SubscriptionHandle) -> None:
        self.handles.add(handle)
        self._queue.append(handle)
        self._wake.set()

    async def _main(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    tg.start_soon(self._run_one, self._queue.popleft())

    async def _run_one(self, handle: SubscriptionHandle) -> None:
        try:
            await handle._serve_to_end()
        finally:
            self.handles.discard(handle)


_hosts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BackgroundHost] = (
    weakref.WeakKeyDictionary()
)


def _host() -> _BackgroundHost:
    loop = asyncio.get_running_loop()
    host = _hosts.get(loop)
    if host is None:
        host = _hosts[loop] = _BackgroundHost(loop)
    return host


def registry() -> weakref.WeakSet[SubscriptionHandle]:
    """Every subscription of this event loop that has started (weakly held)."""
    return _host().registry


def running_handles() -> list[SubscriptionHandle]:
    """Subscriptions of this loop that have not finished, whoever owns them."""
    return [h for h in list(registry()) if h._claimed and not h._done_event.is_set()]


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["SubscriptionHandle", "registry", "running_handles"]
