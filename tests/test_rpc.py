"""RPC over streams: correlation, private reply streams, concurrency, timeouts."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio as redis_asyncio

from core_bus.envelope import Envelope
from core_bus.errors import RpcTimeout
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import DATA_FIELD
from core_bus.rpc import (
    bus_rpc_call,
    bus_rpc_envelope,
    bus_rpc_stream,
    rpc_reply,
    rpc_request,
)
from core_bus.streams.replies import streams_of
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

KB = StreamKeyBuilder()
SERVICE = KB.agent_inbox("rpc-echo")


async def _serve(
    redis: Any,
    *,
    hold: anyio.Event | None = None,
    replies_per_request: int = 1,
    shuffle: bool = False,
    decoy: bool = False,
) -> None:
    """A tiny echo service: XREAD requests, reply ``content * 2`` via ``rpc_reply``.

    ``hold`` delays replying until set (so callers pile up); ``shuffle`` answers
    a batch in random order; ``decoy`` first writes a reply with a foreign
    correlation id to the same reply stream.
    """
    last = "0-0"
    while True:
        reply = await redis.xread({SERVICE: last}, count=100, block=200)
        batch: list[Envelope] = []
        for _stream, entries in streams_of(reply):
            for entry_id, fields in entries:
                last = entry_id
                assert fields is not None
                batch.append(Envelope.from_json(fields[DATA_FIELD]))
        if not batch:
            continue
        if hold is not None:
            await hold.wait()
        if shuffle:
            random.shuffle(batch)
        for req in batch:
            if decoy:
                other = Envelope(role="assistant", content="not yours", correlation_id="decoy")
                assert req.reply_to
                await redis.xadd(req.reply_to, {DATA_FIELD: other.to_json()})
            for n in range(replies_per_request):
                answer = Envelope(role="assistant", content={"double": req.content * 2, "n": n})
                await rpc_reply(redis, req, answer)


@contextlib.asynccontextmanager
async def service(redis_url: str, **kwargs: Any) -> AsyncIterator[None]:
    server_client = redis_asyncio.Redis.from_url(redis_url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _serve(server_client, **kwargs))
            yield
            tg.cancel_scope.cancel()
    finally:
        await server_client.aclose()


@pytest.mark.timeout(30)
async def test_call_gets_its_reply_and_cleans_up_private_stream(redis: Any, redis_url: str) -> None:
    """A call without reply_to gets a private reply stream, its own reply (a decoy with
    another correlation id is ignored) and the private stream is deleted afterwards."""
    async with service(redis_url, decoy=True):
        req = Envelope(role="user", content=21)
        reply = await bus_rpc_call(redis, SERVICE, req, timeout=10)
    assert reply.content == {"double": 42, "n": 0}
    assert req.correlation_id and reply.correlation_id == req.correlation_id
    assert req.reply_to and req.reply_to.startswith(KB.rpc_reply_stream(""))
    assert await redis.exists(req.reply_to) == 0
    assert await redis.keys(KB.rpc_reply_stream("*")) == []


@pytest.mark.timeout(30)
async def test_fifty_concurrent_calls_share_one_blocking_reader(redis_url: str) -> None:
    """50 concurrent calls over one client each get the reply with their own correlation
    id, even answered in random order, while only one connection blocks in XREAD."""
    caller = redis_asyncio.Redis.from_url(redis_url, client_name="rpc-caller")
    admin = redis_asyncio.Redis.from_url(redis_url)
    await admin.flushall()
    hold = anyio.Event()
    results: dict[int, Envelope] = {}

    async def one(i: int) -> None:
        results[i] = await bus_rpc_call(caller, SERVICE, Envelope(role="user", content=i), 20)

    async def blocked_callers() -> int:
        clients = await admin.client_list()
        return sum(
            1 for c in clients if c.get("name") == "rpc-caller" and "b" in str(c.get("flags"))
        )

    try:
        async with service(redis_url, hold=hold, shuffle=True):
            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
                await eventually(
                    lambda: admin.xlen(SERVICE), message="requests published", timeout=10
                )
                await eventually(
                    lambda: _count_is(admin, 50), message="all 50 requests", timeout=10
                )
                assert await blocked_callers() == 1
                hold.set()
            elapsed = time.monotonic() - started
        assert sorted(results) == list(range(50))
        for i, reply in results.items():
            assert reply.content == {"double": 2 * i, "n": 0}
        created = len(caller.connection_pool._available_connections) + len(
            caller.connection_pool._in_use_connections
        )
        print(f"50 concurrent calls: {elapsed * 1000:.0f} ms, pool connections: {created}")
        assert await admin.keys(KB.rpc_reply_stream("*")) == []
    finally:
        await caller.aclose()
        await admin.aclose()


async def _count_is(redis: Any, n: int) -> bool:
    return int(await redis.xlen(SERVICE)) == n


@pytest.mark.timeout(30)
async def test_timeout_raises_rpc_timeout_and_cleans_up(redis: Any) -> None:
    """With nobody serving, the call raises RpcTimeout (a TimeoutError) after about
    `timeout` seconds and leaves no reply stream behind."""
    req = Envelope(role="user", content=1)
    started = anyio.current_time()
    with pytest.raises(RpcTimeout) as info:
        await bus_rpc_call(redis, SERVICE, req, timeout=0.5)
    elapsed = anyio.current_time() - started
    assert isinstance(info.value, TimeoutError)
    assert 0.4 <= elapsed < 5
    assert req.correlation_id and req.correlation_id in str(info.value)
    assert await redis.keys(KB.rpc_reply_stream("*")) == []


@pytest.mark.timeout(30)
async def test_shared_reply_to_ignores_old_and_foreign_entries(redis: Any, redis_url: str) -> None:
    """With an explicit reply_to (kept afterwards), entries already on it and replies to
    other correlation ids are skipped; the prototype name bus_rpc_envelope works too."""
    outbox = KB.agent_outbox("caller")
    stale = Envelope(role="assistant", content="stale", correlation_id="fixed-cid")
    await redis.xadd(outbox, {DATA_FIELD: stale.to_json()})
    async with service(redis_url, decoy=True):
        req = rpc_request("user", 5, reply_to=outbox, correlation_id="fixed-cid")
        reply = await bus_rpc_envelope(redis, SERVICE, req, timeout=10)
    assert reply.content == {"double": 10, "n": 0}
    assert reply.correlation_id == "fixed-cid"
    assert await redis.exists(outbox) == 1


@pytest.mark.timeout(30)
async def test_stream_yields_all_replies_then_ends(redis: Any, redis_url: str) -> None:
    """bus_rpc_stream yields each matching reply in order and ends at max_responses, or
    quietly after `timeout` seconds without a reply; late replies to a private stream
    expire."""
    async with service(redis_url, replies_per_request=3):
        got = [
            r.content["n"]
            async for r in bus_rpc_stream(redis, SERVICE, Envelope(role="user", content=1), 1, 10)
        ]
        assert got == [0, 1, 2]
        capped = [
            r.content["n"]
            async for r in bus_rpc_stream(redis, SERVICE, Envelope(role="user", content=1), 5, 2)
        ]
        assert capped == [0, 1]
    # the third reply to the capped call may land after the caller deleted its private
    # stream: rpc_reply gave it a TTL, so it cannot linger
    for key in await redis.keys(KB.rpc_reply_stream("*")):
        assert 0 < await redis.ttl(key) <= 600


async def test_rpc_reply_needs_reply_to(redis: Any) -> None:
    """The serving helper refuses a request without reply_to instead of writing anywhere."""
    with pytest.raises(ValueError, match="reply_to"):
        await rpc_reply(redis, Envelope(role="user"), Envelope(role="assistant"))


@pytest.mark.timeout(30)
async def test_cancelled_call_releases_reader(redis: Any) -> None:
    """Cancelling a waiting call (e.g. an outer timeout) removes its waiter and deletes
    the private stream, so a later call works normally."""
    from core_bus import rpc

    with anyio.move_on_after(0.3):
        await bus_rpc_call(redis, SERVICE, Envelope(role="user", content=1), timeout=30)
    assert rpc._readers == {}
    with pytest.raises(RpcTimeout):
        await bus_rpc_call(redis, SERVICE, Envelope(role="user", content=1), timeout=0.2)
    assert rpc._readers == {}


@pytest.mark.timeout(30)
async def test_call_with_decoding_resp2_client(redis_url: str) -> None:
    """RPC works the same on a decode_responses=True, RESP2 client (str replies)."""
    client = redis_asyncio.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        await client.flushall()
        async with service(redis_url):
            reply = await bus_rpc_call(client, SERVICE, Envelope(role="user", content=4), 10)
        assert reply.content == {"double": 8, "n": 0}
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_call_survives_redis_restart_while_waiting(redis_server_factory: Any) -> None:
    """Redis restarting (AOF on) while a call waits does not fail the call: the reader
    retries until its deadline and gets the reply written after the restart."""
    server = redis_server_factory(appendonly=True)
    caller = redis_asyncio.Redis.from_url(server.url)
    admin = redis_asyncio.Redis.from_url(server.url)
    result: list[Envelope] = []

    async def call() -> None:
        result.append(await bus_rpc_call(caller, SERVICE, Envelope(role="user", content=3), 30))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await eventually(lambda: _count_is(admin, 1), message="request published")
            await anyio.to_thread.run_sync(server.stop)
            redis_server_factory(port=server.port, data_dir=server.data_dir, appendonly=True)
            async with service(server.url):
                await eventually(lambda: bool(result), timeout=30, message="reply after restart")
        assert result[0].content == {"double": 6, "n": 0}
    finally:
        await caller.aclose()
        await admin.aclose()
