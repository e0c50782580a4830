"""Subscribe to every stream matching glob patterns, including streams created later.

``await start_bus_subscriptions(redis, patterns, group, handler)`` returns
promptly with a :class:`BusSubscriptions` handle; the subscriptions run in the
background until ``await handle.stop()`` (or the end of ``async with handle``).
The handle is a :class:`~core_bus.consume.handle.SubscriptionHandle`, so
``bus_subscriptions(...)`` + ``await tg.start(handle.run)`` runs it in the
caller's task group instead. The prototype's version never returned (it awaited
its discovery loops); :mod:`core_bus.agent_bus_minimal` keeps that form.

Streams are found by :class:`~core_bus.streams.finder.StreamFinder` (discovery
notices, plus a SCAN with ``TYPE stream`` every ``poll_delay`` seconds). Each
matching stream gets exactly one :func:`subscribe` here (streams stay
independent: one stream's failure never ends the others);
:mod:`core_bus.following` reads every match with one subscription instead
(what the supervisor's workers do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.handle import SubscriptionHandle
from core_bus.consume.handlers import Handler, handler_arity
from core_bus.consume.stats import SubscriptionStats
from core_bus.consume.subscription import Subscription, subscription
from core_bus.keys import StreamKeyBuilder, default_consumer_name
from core_bus.log import get_logger
from core_bus.settings import get_settings
from core_bus.streams.closewatch import watch_client
from core_bus.streams.finder import StreamFinder
from core_bus.streams.patterns import glob_match
from core_bus.streams.replies import text

DEFAULT_GROUP = "corebus"

__all__ = [
    "DEFAULT_GROUP",
    "BusSubscriptions",
    "bus_subscriptions",
    "glob_match",
    "pattern_list",
    "start_bus_subscriptions",
]


class BusSubscriptions(SubscriptionHandle):
    """Handle of :func:`start_bus_subscriptions`: one :class:`Subscription` per stream."""

    def __init__(
        self,
        redis: AsyncRedis,
        patterns: list[str],
        group: str,
        handler: Handler,
        *,
        poll_delay: float,
        consumer: str,
        subscribe_options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.redis = redis
        self.patterns = patterns
        self.group = group
        self.consumer = consumer
        self.poll_delay = poll_delay
        self.subscriptions: dict[str, Subscription] = {}
        self._failed: set[str] = set()
        self._handler = handler
        self._options = subscribe_options
        self._log = get_logger("core_bus.discovery", group=group, patterns=",".join(patterns))
        self.finder = StreamFinder(
            redis,
            patterns,
            self._add_found,
            poll_delay=poll_delay,
            keys=StreamKeyBuilder(get_settings().bus_namespace),
            log=self._log,
        )
        self._lock = anyio.Lock()
        self._scope: anyio.CancelScope | None = None
        self._children: anyio.abc.TaskGroup | None = None

    # -- public handle --------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        """Streams subscribed so far."""
        return sorted(self.subscriptions)

    @property
    def scans(self) -> int:
        """Completed SCAN rounds (initial, poll, refresh)."""
        return self.finder.scans

    @property
    def stats(self) -> SubscriptionStats:
        """Counters of all subscriptions added up."""
        total = SubscriptionStats()
        for sub in self.subscriptions.values():
            total.merge(sub.stats)
        return total

    def matches(self, stream: str) -> bool:
        return self.finder.matches(stream)

    async def refresh(self) -> list[str]:
        """SCAN now and subscribe to new matches; returns the streams added."""
        return [stream for stream in await self.finder.scan() if await self._add(stream)]

    def check_pending(self) -> None:
        """Look at the own pending lists of every stream's subscription now."""
        for sub in self.subscriptions.values():
            sub.check_pending()

    # -- internals --------------------------------------------------------------------
    def _request_stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _log_failure(self, error: BaseException) -> None:
        self._log.error("discovery_failed", error=repr(error), exc_info=error)

    async def _serve(self) -> None:
        async with anyio.create_task_group() as children:
            self._children = children
            try:
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    if self._stopping:
                        scope.cancel()
                    # Redis away at start: report started, keep trying in the background.
                    await self.finder.retrying(self.finder.initial, self._mark_started)
                    self._mark_started()
                    await self.finder.follow()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._stop_children()
                self._children = None

    async def _stop_children(self) -> None:
        async with anyio.create_task_group() as tg:
            for sub in list(self.subscriptions.values()):
                tg.start_soon(sub._stop_quietly, self._drain_timeout)
        self._log.info("bus_subscriptions_stopped", streams=len(self.subscriptions))

    async def _add_found(self, streams: list[str]) -> None:
        for stream in streams:
            await self._add(stream)

    async def _add(self, stream: str) -> bool:
        if stream in self.subscriptions or stream in self._failed or not self.matches(stream):
            return False
        async with self._lock:
            if stream in self.subscriptions or self._stopping:
                return False
            if text(await self.redis.type(stream)) != "stream":
                return False  # noticed but deleted (or replaced) since
            if self._children is None:
                return False
            try:
                sub = subscription(
                    self.redis, stream, self._handler, self.group, self.consumer, **self._options
                )
            except Exception as exc:  # one bad stream must not end discovery of the others
                self._failed.add(stream)
                self._log.error("subscribe_failed", stream=stream, error=repr(exc))
                return False
            # Owned by our task group; its error stays on its handle (one stream's
            # failure never ends the others).
            sub._claim()
            self._children.start_soon(sub._serve_to_end)
            self.subscriptions[stream] = sub
        self._log.info("stream_discovered", stream=stream, consumer=self.consumer)
        return True


async def start_bus_subscriptions(
    redis: AsyncRedis,
    patterns: str | Sequence[str],
    group: str | None = DEFAULT_GROUP,
    handler: Handler | None = None,
    poll_delay: float = 5.0,
    *,
    consumer: str | None = None,
    **subscribe_options: Any,
) -> BusSubscriptions:
    """Subscribe ``handler`` (``async def h(env)`` or ``h(env, redis)``) to every stream
    matching ``patterns`` (Redis globs, e.g. ``kb.agent_inbox("*")``), now and later.

    Returns once the streams that exist now are subscribed (or, if Redis is
    unreachable, at once: discovery keeps retrying in the background). All
    subscriptions share ``group`` (``None`` means ``"corebus"``) and one consumer
    name; ``subscribe_options`` go to :func:`subscribe` (``concurrency``,
    ``max_deliveries``...).

    :raises TypeError: ``handler`` is not an accepted handler.
    """
    handle = bus_subscriptions(
        redis, patterns, group, handler, poll_delay, consumer=consumer, **subscribe_options
    )
    watch_client(redis, handle)
    handle._start_background()
    await handle.started()
    return handle


def bus_subscriptions(
    redis: AsyncRedis,
    patterns: str | Sequence[str],
    group: str | None = DEFAULT_GROUP,
    handler: Handler | None = None,
    poll_delay: float = 5.0,
    *,
    consumer: str | None = None,
    **subscribe_options: Any,
) -> BusSubscriptions:
    """A :class:`BusSubscriptions` not started yet (``async with`` / ``tg.start(h.run)``)."""
    if handler is None:
        raise TypeError("start_bus_subscriptions needs a handler")
    handler_arity(handler)
    if poll_delay <= 0:
        raise ValueError("poll_delay must be > 0")
    return BusSubscriptions(
        redis,
        pattern_list(patterns),
        group or DEFAULT_GROUP,
        handler,
        poll_delay=poll_delay,
        consumer=consumer or default_consumer_name(),
        subscribe_options=subscribe_options,
    )


def pattern_list(patterns: str | bytes | Sequence[str | bytes]) -> list[str]:
    """One pattern or several, as a non-empty list of str."""
    found = [text(patterns)] if isinstance(patterns, str | bytes) else [text(p) for p in patterns]
    if not found:
        raise ValueError("start_bus_subscriptions needs at least one pattern")
    return found
