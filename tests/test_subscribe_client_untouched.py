"""subscribe() reads through its own client on the caller's connection pool and must
leave the caller's client exactly as redis-py made it.

The subscription's reader overrides the XREADGROUP response callback to skip
redis-py's parsing; if that override leaked onto the caller's client, every
``xreadgroup`` the application makes itself would suddenly return raw replies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from core_bus.consume.subscription import subscribe
from core_bus.envelope import Envelope
from core_bus.publish import publish_envelope
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

STREAM = "untouched:inbox"


@pytest.fixture(
    params=[(2, False), (2, True), (3, False), (3, True)], ids=lambda p: f"resp{p[0]}-decode{p[1]}"
)
async def client(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    """A caller's client with the given protocol and decoding, on a clean stream."""
    protocol, decode = request.param
    redis = Redis.from_url(redis_url, protocol=protocol, decode_responses=decode)
    await redis.delete(STREAM, "untouched:seen")
    try:
        yield redis
    finally:
        await redis.delete(STREAM, "untouched:seen")
        await redis.aclose()


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """(id, fields) pairs of an XREADGROUP reply in either redis-py shape: a list of
    [stream, entries] (RESP2) or a dict stream -> [entries] (RESP3)."""
    if isinstance(reply, dict):
        return [tuple(e) for batches in reply.values() for batch in batches for e in batch]
    return [tuple(e) for _stream, entries in reply for e in entries]


@pytest.mark.timeout(30)
async def test_caller_client_keeps_redis_py_parsing(client: Redis, redis_url: str) -> None:
    """With a subscription running on the caller's client: the client's XREADGROUP
    callback is still redis-py's own, and its own xreadgroup returns redis-py's parsed
    shape (the same as an untouched client of the same protocol: fields as a dict)."""
    fresh = Redis.from_url(
        redis_url,
        protocol=client.connection_pool.connection_kwargs.get("protocol"),
        decode_responses=client.connection_pool.connection_kwargs["decode_responses"],
    )
    callback = client.response_callbacks["XREADGROUP"]
    assert callback is fresh.response_callbacks["XREADGROUP"]
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.envelope_id)

    sub = await subscribe(client, STREAM, handler, group="sub", block_ms=100)
    try:
        with anyio.fail_after(10):
            await sub.started()
        ids = [
            (await publish_envelope(client, STREAM, Envelope(role="user", content=i)))
            for i in range(3)
        ]
        await eventually(lambda: len(seen) == 3, timeout=10, message="subscription handled 3")

        assert client.response_callbacks["XREADGROUP"] is callback
        await client.xgroup_create(STREAM, "mine", id="0")
        await fresh.xgroup_create(STREAM, "theirs", id="0")
        mine = await client.xreadgroup("mine", "me", {STREAM: ">"}, count=10)
        theirs = await fresh.xreadgroup("theirs", "me", {STREAM: ">"}, count=10)
        assert type(mine) is type(theirs)
        assert _entries(mine) == _entries(theirs)
        entries = _entries(mine)
        assert len(entries) == 3 == len(ids)
        assert all(isinstance(fields, dict) and fields for _id, fields in entries)
    finally:
        await sub.stop()
        await fresh.aclose()
    assert client.response_callbacks["XREADGROUP"] is callback
