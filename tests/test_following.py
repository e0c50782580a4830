"""core_bus.following: one subscription whose streams grow as matching streams appear."""

from __future__ import annotations

from typing import Any

import pytest

from core_bus.envelope import Envelope
from core_bus.following import follow_streams, following
from core_bus.publish import _announced, publish_envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_plain_streams_and_patterns_in_one_subscription(redis: Any) -> None:
    """A plain stream (created if missing) and a pattern's matches, existing and new, are
    read by one Subscription in one group; dead-letter streams never match."""
    await redis.xadd("AG1:user:old:inbox", {"data": Envelope(role="u", content="old").to_json()})
    await redis.xadd("AG1:dlq:user", {"data": b"x"})
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.content)

    async with following(
        redis, ["AG1:agent:fixed:inbox", "AG1:user:*"], handler, "g", "c", poll_delay=3600
    ) as handle:
        assert sorted(handle.streams) == ["AG1:agent:fixed:inbox", "AG1:user:old:inbox"]
        await eventually(lambda: got == ["old"])
        _announced.discard("AG1:user:new:inbox")
        await publish_envelope(redis, "AG1:user:new:inbox", Envelope(role="u", content="new"))
        await publish_envelope(redis, "AG1:agent:fixed:inbox", Envelope(role="u", content="f"))
        await eventually(lambda: sorted(got) == ["f", "new", "old"])
        assert handle.matched("AG1:user:*") == 2
        assert handle.subscription is not None and handle.subscription.group == "g"
        await eventually(lambda: handle.stats.processed == 3, message="acked")
    assert not handle.running


async def test_notice_of_a_deleted_stream_does_not_recreate_it(redis: Any) -> None:
    async def handler(env: Envelope) -> None:
        pass

    handle = await follow_streams(redis, ["AG1:user:*"], handler, "g", poll_delay=3600)
    try:
        await redis.xadd("AG1:bus:streams", {"stream": "AG1:user:gone:inbox"})
        _announced.discard("AG1:user:live:inbox")
        await publish_envelope(redis, "AG1:user:live:inbox", Envelope(role="u"))
        await eventually(lambda: handle.streams == ["AG1:user:live:inbox"])
        assert not await redis.exists("AG1:user:gone:inbox")
    finally:
        await handle.stop()


async def test_stream_created_by_plain_xadd_found_by_the_scan(redis: Any) -> None:
    got: list[Any] = []

    async def handler(env: Envelope, redis: Any) -> None:
        got.append(env.content)

    async with following(redis, ["AG1:flow:*:input"], handler, "g", poll_delay=0.1):
        await redis.xadd("AG1:flow:f:input", {"data": Envelope(role="u", content=1).to_json()})
        await eventually(lambda: got == [1])
