"""subscribe() works with any redis-py client flavour: bytes or str replies, RESP2 or RESP3."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from core_bus import DeadLetter, Envelope, StreamKeyBuilder, publish_envelope, subscribe
from core_bus.streams.deadletter import REASON_BAD_JSON, REASON_POISON
from core_bus.streams.replies import entries_of
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

STREAM = "AG1:agent:flavour:inbox"


@pytest.mark.parametrize(
    "options",
    [
        {"decode_responses": True},
        {"protocol": 3},
        {"protocol": 3, "decode_responses": True},
    ],
    ids=["str-resp2", "bytes-resp3", "str-resp3"],
)
async def test_client_flavours(redis: Any, redis_url: str, options: dict[str, Any]) -> None:
    """Handling, retries, dead letters, malformed entries and own-pending checks behave the
    same whatever the client's reply decoding and protocol."""
    client = redis_asyncio.Redis.from_url(redis_url, **options)
    calls: dict[str, int] = {}

    async def handler(env: Envelope, redis: Any) -> None:
        key = str(env.content)
        calls[key] = calls.get(key, 0) + 1
        if key == "poison":
            raise RuntimeError("always")

    try:
        await publish_envelope(client, STREAM, Envelope(role="user", content="ok"))
        await publish_envelope(client, STREAM, Envelope(role="user", content="poison"))
        await client.xadd(STREAM, {"data": "{nope"})
        sub = await subscribe(
            client, STREAM, handler, group="g", max_deliveries=2, retry_backoff=0.01
        )
        await eventually(lambda: sub.stats.processed == 1 and sub.stats.dead_lettered == 2)
        # an orphan claimed to us is picked up by check_pending()
        await redis.xgroup_create(STREAM, "other", id="$")
        await publish_envelope(client, STREAM, Envelope(role="user", content="orphan"))
        await eventually(lambda: calls.get("orphan") == 1)
        # ... and one of another group's dead consumer, claimed to a second subscription
        reply = await redis.xreadgroup("other", "dead", {STREAM: ">"}, count=1)
        orphan_id = reply[0][1][0][0]
        claimed_by = await subscribe(
            client, STREAM, handler, group="other", block_ms=60_000, pending_check_interval=60
        )
        await claimed_by.started()
        await redis.xclaim(STREAM, "other", claimed_by.consumer, 0, [orphan_id])
        claimed_by.check_pending()
        await eventually(lambda: calls.get("orphan") == 2)
        await claimed_by.stop()
        await sub.stop()
        assert calls == {"ok": 1, "poison": 2, "orphan": 2}
        raw = await redis.xrange(StreamKeyBuilder().dead_letter("g"))
        reasons = sorted(DeadLetter.from_fields(i, f).reason for i, f in entries_of(raw) if f)
        assert reasons == sorted([REASON_POISON, REASON_BAD_JSON])
        assert int((await redis.xpending(STREAM, "g"))["pending"]) == 0
    finally:
        await client.aclose()


async def test_blocking_read_fits_the_socket_timeout(redis_url: str) -> None:
    """With a client socket_timeout shorter than block_ms, idle reads end in time: no
    spurious connection_lost, and entries still arrive."""
    from structlog.testing import capture_logs

    client = redis_asyncio.Redis.from_url(redis_url, socket_timeout=0.3)
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.content)

    try:
        with capture_logs() as logs:
            sub = await subscribe(client, STREAM, handler, group="g", block_ms=5000)
            await sub.started()

            async def reads() -> int:
                info = await client.info("commandstats")
                return int(info.get("cmdstat_xreadgroup", {}).get("calls", 0))

            before = await reads()

            async def idle_reads_ended() -> bool:
                return await reads() >= before + 3

            await eventually(idle_reads_ended, timeout=10)
            await publish_envelope(client, STREAM, Envelope(role="user", content="late"))
            await eventually(lambda: seen == ["late"], timeout=10)
            await sub.stop()
        assert "connection_lost" not in [e["event"] for e in logs]
    finally:
        await client.aclose()
