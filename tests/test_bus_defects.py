"""Defects of wave 1's bus, each pinned by a test that failed on the old code.

Real redis-servers throughout: the session's private one, and private ones
started (paused, demoted, killed) by the fault tests themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as redis_asyncio

from core_bus import Envelope, StreamKeyBuilder, publish_envelope, subscribe
from core_bus.consume import deadletters
from core_bus.consume.subscription import Subscription, subscription
from core_bus.ordered import subscribe_ordered
from core_bus.publish import _announced
from core_bus.settings import redact_url
from core_bus.streams.errors import is_nogroup, is_transient
from supervisor.redis.server import RedisServerProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEYS = StreamKeyBuilder()


def env(n: int = 0) -> Envelope:
    return Envelope(role="user", content={"n": n})


async def dlq_len(redis: Any, group: str) -> int:
    return int(await redis.xlen(KEYS.dead_letter(group)))


async def nothing_pending(redis: Any, stream: str, group: str) -> bool:
    return int((await redis.xpending(stream, group))["pending"]) == 0


async def test_dead_letter_write_that_times_out_is_written_once_redis_answers(
    redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead-letter MULTI/EXEC that times out (CLIENT PAUSE WRITE) is not forgotten:
    the entry stays held, the write is retried and lands once Redis answers again,
    exactly once, and nothing stays pending (wave 1 kept it held forever)."""
    monkeypatch.setattr(deadletters, "WRITE_TIMEOUT", 0.3)
    stream, group = "AG1:agent:paused:inbox", "paused"
    side = redis_asyncio.Redis.from_url(redis_url)
    paused = anyio.Event()

    async def handler(_env: Envelope) -> None:
        if not paused.is_set():
            paused.set()
            await side.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        raise RuntimeError("always fails")

    sub = await subscribe(redis, stream, handler, group, "c1", max_deliveries=1)
    try:
        await sub.started()
        await publish_envelope(redis, stream, env())
        await eventually(lambda: dlq_len(redis, group), 15, message="dead letter written")
        await eventually(lambda: nothing_pending(redis, stream, group), 10, message="acked")
        # The timed-out MULTI/EXEC may still run when the pause ends; the writer's
        # retry then finds the entry acked and only releases it (no second letter).
        await eventually(lambda: len(sub.held) == 0, 10, message="released")
        assert await dlq_len(redis, group) == 1
    finally:
        await sub.stop(2)
        await side.aclose()


async def test_ordered_subscription_waits_for_redis_at_start(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    """Redis unreachable when an ordered subscription starts: it waits and retries
    like a plain one (wave 1 failed at once, so a supervised worker exited 1)."""
    server = redis_server_factory(appendonly=False)
    port = server.port
    server.kill()
    client = redis_asyncio.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=2)
    seen: list[Any] = []

    async def handler(e: Envelope) -> None:
        seen.append(e.content)

    base = "AG1:agent:late:inbox"
    sub = await subscribe_ordered(client, [base], 2, handler, "late", "o1", lease_ttl=2.0)
    try:
        with anyio.move_on_after(1.0):
            await sub.wait()
        assert sub.error is None and sub.running
        redis_server_factory(appendonly=False, port=port, data_dir=server.data_dir)
        with anyio.fail_after(20):
            await sub.started()
        await publish_envelope(client, KEYS.route(base, "k", 2), env(7))
        await eventually(lambda: seen, 15, message="entry handled after Redis came up")
        assert seen == [{"n": 7}]
    finally:
        await sub.stop(2)
        await client.aclose()


async def test_ordered_subscription_rides_out_readonly(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    """READONLY (a demoted master during a failover) is transient for ordered shards'
    lease and heartbeat writes too: the subscription backs off instead of failing,
    and consumes again once the server takes writes."""
    primary = redis_server_factory(appendonly=False)
    other = redis_server_factory(appendonly=False)
    client = redis_asyncio.Redis.from_url(primary.url, socket_timeout=2)
    admin = redis_asyncio.Redis.from_url(primary.url)
    seen: list[Any] = []

    async def handler(e: Envelope) -> None:
        seen.append(e.content)

    base = "AG1:agent:ro:inbox"
    sub = await subscribe_ordered(client, [base], 1, handler, "ro", "o1", lease_ttl=1.0)
    try:
        await sub.started()
        await admin.execute_command("REPLICAOF", "127.0.0.1", other.port)
        await eventually(
            lambda: _is_replica_synced(admin), 15, message="primary demoted and synced"
        )
        with anyio.move_on_after(2.0):  # several ownership rounds hit READONLY
            await sub.wait()
        assert sub.error is None, sub.error
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await publish_envelope(admin, KEYS.shard_stream(base, 0), env(1))
        await eventually(lambda: seen, 20, message="consuming again after promotion")
    finally:
        await sub.stop(2)
        await client.aclose()
        await admin.aclose()


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _is_replica_synced(admin: Any) -> bool:
    info = await admin.info("replication")
    return info.get("role") == "slave" and info.get("master_link_status") == "up"


async def test_failed_discovery_notice_does_not_fail_the_publish(redis: Any) -> None:
    """The entry is written; a notice that fails (wrong-type key here, an ACL in real
    life) is logged, not raised: a caller that retries on error would duplicate it."""
    _announced.clear()
    await redis.set(KEYS.discovery_stream(), "not a stream")
    stream = "AG1:agent:notice:inbox"
    first = await publish_envelope(redis, stream, env(1))
    second = await publish_envelope(redis, stream, env(2))
    assert first != second
    assert await redis.xlen(stream) == 2


def test_redact_url_keeps_ipv6_brackets() -> None:
    assert redact_url("redis://u:secret@[::1]:6390/0") == "redis://u:***@[::1]:6390/0"
    assert redact_url("redis://:secret@[fe80::1]/2") == "redis://:***@[fe80::1]/2"
    assert redact_url("redis://u:pw@host:7000/1") == "redis://u:***@host:7000/1"
    assert redact_url("redis://host:7000/1") == "redis://host:7000/1"


def test_one_transient_error_definition() -> None:
    """READONLY/MASTERDOWN/LOADING (also inside a pipeline's error) and NOGROUP in a
    pipeline error are recognised by the one definition every loop uses."""
    from redis.exceptions import ReadOnlyError, ResponseError

    assert is_transient(ReadOnlyError("READONLY You can't write against a read only replica."))
    assert is_transient(
        ResponseError(
            "Command # 1 (XACK s g 1-0) of pipeline caused error: "
            "READONLY You can't write against a read only replica."
        )
    )
    assert is_transient(TimeoutError())
    assert not is_transient(ResponseError("WRONGTYPE Operation against a key"))
    assert is_nogroup(
        ResponseError(
            "Command # 1 (XPENDING s g - + 1) of pipeline caused "
            "error: NOGROUP No such key 's' or consumer group 'g'"
        )
    )


async def test_nudge_wakes_the_reader_without_dropping_its_connection(
    redis: Any,
) -> None:
    """check_pending() (the worker's SIGUSR1) makes a blocked reader look at its own
    pending list at once, by CLIENT UNBLOCK: the reader keeps its connection (wave 1
    cancelled the read, and redis-py dropped the connection at every nudge)."""
    stream, group = "AG1:agent:nudge:inbox", "nudge"
    got: list[Any] = []

    async def handler(e: Envelope) -> None:
        got.append(e.content["n"])

    sub = await subscribe(
        redis, stream, handler, group, "receiver", block_ms=4000, pending_check_interval=60
    )
    try:
        await sub.started()
        await eventually(lambda: sub._blocked_read and sub._reader_id, 5, message="reader blocked")
        reader_id = sub._reader_id
        await redis.xgroup_createconsumer(stream, group, "other")
        for n in range(5):
            await publish_envelope(redis, "AG1:agent:nudge:side", env(n))
            entry_id = await redis.xadd(stream, {"data": env(n).to_json()})
            # deliver to "other" without the receiver's read seeing it, then claim it over
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xclaim(stream, group, "receiver", 0, [entry_id])
                await pipe.execute()
            started = anyio.current_time()
            sub.check_pending()
            await eventually(lambda n=n: n in got, 3, message=f"nudged entry {n} handled")
            assert anyio.current_time() - started < 2.0
            await eventually(lambda: sub._blocked_read, 5, message="reader blocked again")
        assert sub._reader_id == reader_id, "the reader reconnected after a nudge"
        clients = await redis.client_list()
        assert any(int(c["id"]) == reader_id for c in clients), "reader connection gone"
        assert sub.stats.reconnects == 0
    finally:
        await sub.stop(2)


async def test_structured_forms_and_error_reaches_the_owner(redis: Any) -> None:
    """``async with`` and ``tg.start(sub.run)`` run a subscription in the caller's task
    group; a fatal error (the stream is a string key) reaches the owner."""
    got: list[Any] = []

    async def handler(e: Envelope) -> None:
        got.append(e.content["n"])

    stream = "AG1:agent:structured:inbox"
    async with subscription(redis, stream, handler, "sg", "c") as sub:
        await publish_envelope(redis, stream, env(1))
        await eventually(lambda: got == [1], 5)
    assert not sub.running

    async with anyio.create_task_group() as tg:
        other = subscription(redis, stream, handler, "sg", "c")
        await tg.start(other.run)
        await publish_envelope(redis, stream, env(2))
        await eventually(lambda: got == [1, 2], 5)
        await other.stop(1)

    await redis.set("AG1:agent:broken:inbox", "x")
    broken: Subscription = subscription(redis, "AG1:agent:broken:inbox", handler, "bg", "c")
    with pytest.raises(BaseException) as raised:
        async with anyio.create_task_group() as tg:
            await tg.start(broken.run)
    assert "WRONGTYPE" in str(_leaf(raised.value))
    background = await subscribe(redis, "AG1:agent:broken:inbox", handler, "bg", "c")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await background.started()
    with pytest.raises(Exception, match="WRONGTYPE"):
        await background.wait()


async def test_nothing_stays_held_after_retries_dead_letters_and_stop(redis: Any) -> None:
    """Every path out of a subscription's hands releases the entry: acks, retries,
    dead letters, deleted entries and a stop that leaves running handlers behind."""
    stream, group = "AG1:agent:held:inbox", "held"
    failed: set[int] = set()
    slow = anyio.Event()

    async def handler(e: Envelope) -> None:
        n = e.content["n"]
        if n == -1:
            await slow.wait()  # never set: still running when the subscription stops
        if n % 5 == 0 and n not in failed:
            failed.add(n)
            raise RuntimeError("once")
        if n % 7 == 0:
            raise RuntimeError("always")

    sub = await subscribe(
        redis,
        stream,
        handler,
        group,
        "c",
        max_deliveries=2,
        retry_backoff=0.01,
        retry_backoff_max=0.02,
    )
    try:
        await sub.started()
        ids = [await publish_envelope(redis, stream, env(n)) for n in range(1, 41)]
        await redis.xdel(stream, ids[-1])
        await eventually(lambda: nothing_pending(redis, stream, group), 15, message="settled")
        assert len(sub.held) == 0
        assert await dlq_len(redis, group) == 5  # 7, 14, 21, 28, 35
        await publish_envelope(redis, stream, env(-1))
        await eventually(lambda: sub.stats.in_flight == 1, 5)
    finally:
        await sub.stop(0.2)
    assert len(sub.held) == 0
