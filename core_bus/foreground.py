"""Running a subscription in the foreground, as the prototype's entry points did.

The prototype's ``start_bus_subscriptions`` (and its other entry points)
never returned: ``asyncio.run(main())`` kept the agent alive until Ctrl-C.
:func:`run_until_stopped` gives our handles that form: it runs the handle in
the caller's task and returns when it is told to stop. While it runs it takes
SIGINT and SIGTERM *if nobody else handles them* (Python's default Ctrl-C
handler, asyncio.run's, or SIG_DFL): the first one drains the subscription and
returns normally, so ``asyncio.run(main())`` ends with exit 0 and no
traceback; a second one goes to the previous handler (a forced stop).
Cancellation of the caller drains the subscription too (shielded) and
propagates.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType
from typing import Any

import anyio

from core_bus.consume.handle import SubscriptionHandle

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class StopSignals:
    """``with StopSignals() as stop: await stop.wait()``: SIGINT/SIGTERM as an event."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._event = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._installed: dict[int, SignalHandler] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if not _unclaimed(sig, previous):
                continue
            try:
                self._loop.add_signal_handler(sig, self._fire, sig)
            except (ValueError, RuntimeError, NotImplementedError):
                continue
            self._installed[sig] = previous
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig in list(self._installed):
            self._restore(sig)

    async def wait(self) -> None:
        await self._event.wait()

    def _fire(self, sig: int) -> None:
        self.received = sig
        self._restore(sig)  # a second one goes to whoever handled it before us
        self._event.set()

    def _restore(self, sig: int) -> None:
        previous = self._installed.pop(sig)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(sig)
        signal.signal(sig, previous)


def _unclaimed(sig: int, handler: SignalHandler) -> bool:
    """True for the handlers nobody chose on purpose (so taking them over is safe)."""
    if sig == signal.SIGINT:
        if handler is signal.default_int_handler:
            return True
        func = getattr(handler, "func", None)  # asyncio.Runner's functools.partial
        return getattr(func, "__qualname__", "") == "Runner._on_sigint"
    return handler == signal.SIG_DFL


async def run_until_stopped(
    handle: SubscriptionHandle, on_started: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run ``handle`` here until SIGINT/SIGTERM (then drain and return) or cancellation
    (drain, then propagate). ``on_started`` runs once it consumes (the signals are
    already taken by then). A fatal error of the subscription is raised."""
    with StopSignals() as stop:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(handle.run)
                if on_started is not None:
                    await on_started()

                async def stop_on_signal() -> None:
                    await stop.wait()
                    await handle.stop()

                tg.start_soon(stop_on_signal)
                await handle.wait()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            with anyio.CancelScope(shield=True):
                await handle._stop_quietly()
    if handle.error is not None:
        raise handle.error


async def run_until_signal(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` until it returns, or until SIGINT/SIGTERM (then cancel it and return)."""
    with StopSignals() as stop:
        try:
            async with anyio.create_task_group() as tg:

                async def cancel_on_signal() -> None:
                    await stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(cancel_on_signal)
                await body()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
