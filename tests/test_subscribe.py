"""subscribe(): background consumption, batching, acks, concurrency bound, stop/drain."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from core_bus import Envelope, Subscription, SubscriptionStats, publish_many, subscribe
from core_bus.bus import ensure_group
from core_bus.bus import subscribe as bus_subscribe
from core_bus.consume.subscription import active_subscriptions
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

STREAM = "AG1:agent:sub:inbox"


async def pending_count(redis: Any, stream: str, group: str) -> int:
    info = await redis.xpending(stream, group)
    return int(info["pending"])


async def test_processes_and_acks_every_entry(redis: Any) -> None:
    """Every published envelope reaches the handler once, with a trace hop, and is acked."""
    seen: list[Envelope] = []

    async def handler(env: Envelope) -> None:
        seen.append(env)

    await publish_many(redis, STREAM, [Envelope(role="user", content=i) for i in range(250)])
    sub = await subscribe(redis, STREAM, handler, group="g1", count=50)
    assert isinstance(sub, Subscription) and isinstance(sub.stats, SubscriptionStats)
    await sub.started()
    assert sub.running
    await eventually(lambda: sub.stats.processed == 250, timeout=10)
    assert sorted(e.content for e in seen) == list(range(250))
    assert all(e.trace and e.trace[-1].startswith("g1:") for e in seen)
    assert await pending_count(redis, STREAM, "g1") == 0
    await sub.stop()
    assert not sub.running
    assert sub.consumer.count(":") >= 2 and sub.streams == [STREAM] and sub.group == "g1"


async def test_subscribe_returns_before_traffic_and_sees_later_entries(redis: Any) -> None:
    """subscribe() does not block; entries published afterwards are delivered promptly."""
    got = anyio.Event()

    async def handler(env: Envelope, redis_client: Any) -> None:
        assert redis_client is redis
        got.set()

    with anyio.fail_after(2):
        sub = await subscribe(redis, "AG1:agent:later:inbox", handler, group="g", block_ms=5000)
        await sub.started()
    await publish_many(redis, "AG1:agent:later:inbox", [Envelope(role="user")])
    with anyio.fail_after(5):
        await got.wait()
    await sub.stop()


async def test_stream_list_is_read_together(redis: Any) -> None:
    """A list of streams is consumed by one subscription; the handler sees all of them."""
    streams = [f"AG1:agent:multi{i}:inbox" for i in range(3)]
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(str(env.content))

    for name in streams:
        await publish_many(
            redis, name, [Envelope(role="user", content=f"{name}/{i}") for i in range(5)]
        )
    sub = await subscribe(redis, streams, handler, group="gm")
    await eventually(lambda: sub.stats.processed == 15)
    assert sorted(seen) == sorted(f"{n}/{i}" for n in streams for i in range(5))
    assert sub.streams == streams
    await sub.stop()


async def test_concurrency_bound_is_respected(redis: Any) -> None:
    """No more than ``concurrency`` handlers run at once, and that many do run in parallel."""
    running = 0
    peak = 0
    release = anyio.Event()

    async def handler(env: Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    await publish_many(redis, STREAM, [Envelope(role="user", content=i) for i in range(40)])
    sub = await subscribe(redis, STREAM, handler, group="gc", concurrency=4, count=10)
    await eventually(lambda: running == 4)
    assert sub.stats.in_flight == 4
    release.set()
    await eventually(lambda: sub.stats.processed == 40)
    assert peak == 4
    await sub.stop()


async def test_handler_signature_checked_at_subscribe(redis: Any) -> None:
    """Anything but ``async def h(env)`` / ``h(env, redis)`` / async __call__ is a TypeError."""

    def sync_handler(env: Envelope) -> None:
        pass

    async def three(env: Envelope, redis: Any, extra: Any) -> None:
        pass

    async def none() -> None:
        pass

    for bad in (sync_handler, three, none, 42, lambda env: None):
        with pytest.raises(TypeError):
            await subscribe(redis, STREAM, bad, group="gt")  # type: ignore[arg-type]

    class Callable:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, env: Envelope) -> None:
            self.calls += 1

    obj = Callable()
    await publish_many(redis, STREAM, [Envelope(role="user")])
    sub = await subscribe(redis, STREAM, obj, group="gt")
    await eventually(lambda: obj.calls == 1)
    await sub.stop()


async def test_stop_drains_in_flight_and_leaves_unfinished_pending(redis: Any) -> None:
    """stop() lets running handlers finish and acks them; the rest stays pending."""
    started = 0
    finish = anyio.Event()

    async def handler(env: Envelope) -> None:
        nonlocal started
        started += 1
        await finish.wait()

    await publish_many(redis, STREAM, [Envelope(role="user", content=i) for i in range(20)])
    sub = await subscribe(redis, STREAM, handler, group="gd", concurrency=3, count=10)
    await eventually(lambda: started == 3)

    async def stopper() -> None:
        await sub.stop(drain_timeout=10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
        await eventually(lambda: not sub.running)
        finish.set()
    assert started == 3  # queued entries were not started after stop()
    assert sub.stats.processed == 3
    # A restarted worker (same consumer name) gets exactly the 17 others.
    rest: list[int] = []

    async def second(env: Envelope) -> None:
        rest.append(int(env.content))

    again = await subscribe(redis, STREAM, second, group="gd", consumer=sub.consumer)
    await eventually(lambda: again.stats.processed == 17)
    await again.stop()
    assert len(rest) == 17 and len(set(rest)) == 17


async def test_stop_timeout_cancels_and_keeps_entries_pending(redis: Any) -> None:
    """A handler that outlives drain_timeout is cancelled; its entry is not acked."""
    entered = anyio.Event()
    cancelled = False

    async def handler(env: Envelope) -> None:
        nonlocal cancelled
        entered.set()
        try:
            await anyio.sleep_forever()
        except BaseException:
            cancelled = True
            raise

    await publish_many(redis, STREAM, [Envelope(role="user")])
    sub = await subscribe(redis, STREAM, handler, group="gs")
    with anyio.fail_after(5):
        await entered.wait()
    with anyio.fail_after(5):
        await sub.stop(drain_timeout=0.2)
    assert cancelled
    assert sub.stats.processed == 0 and sub.stats.in_flight == 0
    assert await pending_count(redis, STREAM, "gs") == 1


async def test_prototype_import_surface(redis: Any) -> None:
    """core_bus.bus keeps the prototype names; ensure_group tolerates BUSYGROUP."""
    assert bus_subscribe is subscribe
    await ensure_group(redis, "AG1:agent:eg:inbox", "g")
    await ensure_group(redis, "AG1:agent:eg:inbox", "g")
    groups = await redis.xinfo_groups("AG1:agent:eg:inbox")
    assert len(groups) == 1


async def test_dropped_handle_keeps_running_until_stopped(redis: Any) -> None:
    """A subscription whose handle is dropped keeps consuming and is listed as active."""
    seen = 0

    async def handler(env: Envelope) -> None:
        nonlocal seen
        seen += 1

    await subscribe(redis, STREAM, handler, group="gh")
    await publish_many(redis, STREAM, [Envelope(role="user")])
    await eventually(lambda: seen == 1)
    subs = [s for s in active_subscriptions() if s.group == "gh"]
    assert len(subs) == 1
    await subs[0].stop()
    await asyncio.sleep(0)
    assert not [s for s in active_subscriptions() if s.group == "gh"]


async def test_fatal_error_surfaces_via_started_wait_and_stop(redis: Any) -> None:
    """A non-transient Redis error (stream key of the wrong type) fails the subscription
    loudly: started(), wait() and stop() re-raise it instead of losing it."""
    from redis.exceptions import ResponseError

    await redis.set("AG1:agent:wrongtype:inbox", "not a stream")

    async def handler(env: Envelope) -> None:
        pass

    sub = await subscribe(redis, "AG1:agent:wrongtype:inbox", handler, group="g")
    with anyio.fail_after(5), pytest.raises(ResponseError):
        await sub.started()
    with pytest.raises(ResponseError):
        await sub.wait()
    with pytest.raises(ResponseError):
        await sub.stop()
    assert not sub.running


async def test_stop_right_after_subscribe(redis: Any) -> None:
    """stop() immediately after subscribe() returns cleanly and leaves nothing running."""

    async def handler(env: Envelope) -> None:
        pass

    sub = await subscribe(redis, STREAM, handler, group="g0")
    with anyio.fail_after(5):
        await sub.stop()
    assert not sub.running and sub not in active_subscriptions()


async def test_handler_gets_redis_and_no_info_log_per_message(redis: Any) -> None:
    """Hot path logs nothing at info level per message (only start/stop events)."""
    from structlog.testing import capture_logs

    async def handler(env: Envelope, redis: Any) -> None:
        pass

    await publish_many(redis, STREAM, [Envelope(role="user") for _ in range(50)])
    with capture_logs() as logs:
        sub = await subscribe(redis, STREAM, handler, group="gl")
        await eventually(lambda: sub.stats.processed == 50)
        await sub.stop()
    events = [e["event"] for e in logs]
    assert events == ["subscription_started", "subscription_stopped"]
    assert all(e.get("group") == "gl" and e.get("consumer") == sub.consumer for e in logs)
