"""A subscription survives its Redis server being SIGKILLed and restarted (AOF on)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from structlog.testing import capture_logs

from core_bus import Envelope, publish_many, subscribe
from supervisor.redis.server import RedisServerProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

STREAM = "AG1:agent:crash:inbox"
ALWAYS_FSYNC = ["--appendfsync", "always"]  # a SIGKILL loses nothing that was acknowledged


def client_for(server: RedisServerProcess) -> Any:
    """A client without redis-py's own retries, so the bus's reconnect logic is what runs."""
    return redis_asyncio.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))


async def test_resumes_after_server_sigkill_and_restart(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    """Kill -9 the server while handlers are mid-flight and acks are pending, restart it on
    the same port and data dir: every entry (old and new) is processed, nothing stays
    pending, and the outage is logged once (lost, then restored)."""
    server = redis_server_factory(appendonly=True, extra_args=ALWAYS_FSYNC)
    client = client_for(server)
    gate = anyio.Event()
    seen: set[int] = set()

    async def handler(env: Envelope) -> None:
        if int(env.content) >= 50:
            await gate.wait()
        seen.add(int(env.content))

    await publish_many(client, STREAM, [Envelope(role="user", content=i) for i in range(200)])
    with capture_logs() as logs:
        sub = await subscribe(
            client, STREAM, handler, group="g", concurrency=8, count=20, pending_check_interval=0.2
        )
        await eventually(lambda: len(seen) == 50 and sub.stats.in_flight == 8, timeout=15)
        await eventually(lambda: sub.stats.processed == 50, timeout=15)
        server.kill()
        gate.set()  # handlers finish while Redis is down: their acks must wait
        await eventually(lambda: sub._watch.lost_since, timeout=15, message="connection_lost")
        restarted = redis_server_factory(
            data_dir=server.data_dir, port=server.port, appendonly=True, extra_args=ALWAYS_FSYNC
        )
        assert restarted.port == server.port
        await publish_many(
            client, STREAM, [Envelope(role="user", content=i) for i in range(200, 250)]
        )
        await eventually(lambda: seen == set(range(250)), timeout=30, message="all entries")

        async def nothing_pending() -> bool:
            return int((await client.xpending(STREAM, "g"))["pending"]) == 0

        await eventually(nothing_pending, timeout=15)
        await sub.stop()
    await client.aclose()
    events = [e["event"] for e in logs]
    assert events.count("connection_lost") >= 1
    assert events.count("connection_lost") == events.count("connection_restored") <= 3
    assert sub.stats.reconnects == events.count("connection_restored")
    assert sub.stats.dead_lettered == 0


async def test_stop_while_redis_is_down_returns(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    """stop() returns within its bounds when Redis is gone (acks that cannot be
    written stay pending) and the subscription did not fail."""
    server = redis_server_factory(appendonly=False)
    client = client_for(server)
    done = 0

    async def handler(env: Envelope) -> None:
        nonlocal done
        done += 1

    await publish_many(client, STREAM, [Envelope(role="user", content=1)])
    sub = await subscribe(client, STREAM, handler, group="g")
    await eventually(lambda: sub.stats.processed == 1, timeout=10)
    server.kill()
    await eventually(lambda: sub._watch.lost_since, timeout=15)
    with anyio.fail_after(15):
        await sub.stop(drain_timeout=1)
    await client.aclose()
