"""One consumer-group subscription whose streams grow as matching streams appear.

What a supervised agent with ``streams = ["AG1:agent:*:inbox"]`` runs in each
worker: plain streams are read from the start, streams matching the patterns
are added as :class:`~core_bus.streams.finder.StreamFinder` reports them (a
discovery notice: within a round trip; a plain XADD: within ``poll_delay``),
all in the agent's group and read by **one** :class:`Subscription`, so one
XREADGROUP serves every stream and idle cost does not grow with a reader per
stream (compare :class:`core_bus.discovery.BusSubscriptions`, one subscription
per stream). A new stream's group is created at ``group_start_id`` (``"0"``),
so its first entry, written before anyone followed it, is read too.
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
from core_bus.streams.finder import StreamFinder
from core_bus.streams.patterns import glob_match, is_pattern
from core_bus.streams.replies import text


class FollowingSubscription(SubscriptionHandle):
    """Reads ``streams`` (plain names and glob patterns) in ``group``, new matches included."""

    def __init__(
        self,
        redis: AsyncRedis,
        streams: Sequence[str],
        handler: Handler,
        group: str,
        consumer: str,
        *,
        poll_delay: float,
        keys: StreamKeyBuilder,
        subscribe_options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.patterns = [s for s in streams if is_pattern(s)]
        self.plain = [s for s in streams if not is_pattern(s)]
        self.subscription: Subscription | None = None
        self._handler = handler
        self._keys = keys
        self._options = {**subscribe_options, "keys": keys}
        self._log = get_logger(
            "core_bus.following", group=group, consumer=consumer, patterns=",".join(self.patterns)
        )
        self.finder = StreamFinder(
            redis, self.patterns, self._add, poll_delay=poll_delay, keys=keys, log=self._log
        )
        self._lock = anyio.Lock()
        self._scope: anyio.CancelScope | None = None
        self._children: anyio.abc.TaskGroup | None = None

    # -- public handle --------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        """Every stream read so far (plain ones and matches)."""
        return list(self.subscription.streams) if self.subscription is not None else []

    @property
    def stats(self) -> SubscriptionStats:
        return self.subscription.stats if self.subscription is not None else SubscriptionStats()

    def matched(self, pattern: str) -> int:
        """How many streams read now match ``pattern``."""
        return sum(1 for s in self.streams if glob_match(pattern, s))

    def check_pending(self) -> None:
        if self.subscription is not None:
            self.subscription.check_pending()

    async def refresh(self) -> None:
        """SCAN now (tests, and callers that just created streams without a notice)."""
        await self.finder.refresh()

    # -- internals --------------------------------------------------------------------
    def _request_stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _log_failure(self, error: BaseException) -> None:
        self._log.error("following_failed", error=repr(error), exc_info=error)

    async def _serve(self) -> None:
        async with anyio.create_task_group() as children:
            self._children = children
            try:
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    if self._stopping:
                        scope.cancel()
                    if self.plain:
                        await self._add(self.plain)
                    if self.patterns:  # READY waits for Redis, as plain streams do
                        await self.finder.retrying(self.finder.initial)
                    if self.subscription is not None:
                        await self.subscription.started()
                    self._mark_started()
                    self._log.info("following_started", streams=len(self.streams))
                    if self.patterns:
                        await self.finder.follow()
                    else:
                        await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    if self.subscription is not None:
                        await self.subscription._stop_quietly(self._drain_timeout)
                self._children = None
        if self.subscription is not None and self.subscription.error is not None:
            raise self.subscription.error

    async def _add(self, streams: list[str]) -> None:
        """Read ``streams`` too (those that still exist as streams, or are plain names)."""
        async with self._lock:
            known = set(self.streams)
            new = [s for s in streams if s not in known]
            if not new or self._stopping or self._children is None:
                return
            found = [s for s in new if s not in self.plain]
            if found:  # a notice may name a stream deleted (or replaced) since
                async with self.redis.pipeline(transaction=False) as pipe:
                    for stream in found:
                        pipe.type(stream)
                    types = dict(zip(found, await pipe.execute(), strict=True))
                new = [s for s in new if s in self.plain or text(types[s]) == "stream"]
            if not new:
                return
            if self.subscription is None:
                sub = subscription(
                    self.redis, new, self._handler, self.group, self.consumer, **self._options
                )
                sub._claim()
                self._children.start_soon(self._run_subscription, sub)
                self.subscription = sub
            else:
                new = await self.subscription.add_streams(new)
        if found and new:
            self._log.info("streams_followed", count=len(new), first=new[0])

    async def _run_subscription(self, sub: Subscription) -> None:
        await sub._serve_to_end()
        if sub.error is not None and self._scope is not None:
            self._scope.cancel()  # its error ends us (the worker exits and is restarted)


def following(
    redis: AsyncRedis,
    streams: Sequence[str],
    handler: Handler,
    group: str,
    consumer: str | None = None,
    *,
    poll_delay: float = 5.0,
    keys: StreamKeyBuilder | None = None,
    **subscribe_options: Any,
) -> FollowingSubscription:
    """A :class:`FollowingSubscription` not started yet (``async with`` / ``tg.start(h.run)``)."""
    handler_arity(handler)
    if not streams:
        raise ValueError("following needs at least one stream or pattern")
    if poll_delay <= 0:
        raise ValueError("poll_delay must be > 0")
    return FollowingSubscription(
        redis,
        [text(s) for s in streams],
        handler,
        group,
        consumer or default_consumer_name(),
        poll_delay=poll_delay,
        keys=keys or StreamKeyBuilder(get_settings().bus_namespace),
        subscribe_options=subscribe_options,
    )


async def follow_streams(
    redis: AsyncRedis, streams: Sequence[str], handler: Handler, group: str, **options: Any
) -> FollowingSubscription:
    """Start :func:`following` in the background; returns once the streams that exist are read."""
    handle = following(redis, streams, handler, group, **options)
    handle._start_background()
    await handle.started()
    return handle
