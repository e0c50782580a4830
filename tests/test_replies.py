"""core_bus.streams.replies normalises XREAD replies of every client flavour."""

from __future__ import annotations

import pytest
import redis.asyncio as redis_asyncio

from core_bus.streams.replies import streams_of

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode", [False, True])
async def test_streams_of_gives_ids_and_fields(redis_url: str, protocol: int, decode: bool) -> None:
    """RESP2 lists and RESP3 maps (with redis-py's extra list level) read the same."""
    client = redis_asyncio.Redis.from_url(redis_url, protocol=protocol, decode_responses=decode)
    try:
        await client.delete("t:replies")
        first = await client.xadd("t:replies", {"data": "a"})
        second = await client.xadd("t:replies", {"data": "b"})
        parsed = streams_of(await client.xread({"t:replies": "0"}))
        ids = [first, second]
        expected_ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        assert [s for s, _ in parsed] == ["t:replies"]
        assert [entry_id for entry_id, _ in parsed[0][1]] == expected_ids
        values = [f["data"] for _, f in parsed[0][1] if f is not None]
        assert [v.decode() if isinstance(v, bytes) else v for v in values] == ["a", "b"]
        assert streams_of(await client.xread({"t:replies": "$"}, block=1)) in (
            [],
            [("t:replies", [])],
        )
    finally:
        await client.aclose()
