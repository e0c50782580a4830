"""Own-pending checks: entries XCLAIMed to this consumer by another client (the supervisor)."""

from __future__ import annotations

from typing import Any

import pytest

from core_bus import Envelope, publish_envelope, subscribe
from core_bus.bus import ensure_group
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

STREAM = "AG1:agent:claim:inbox"


async def orphan(redis: Any, group: str, content: str) -> bytes:
    """An entry delivered to a consumer that then died (pending for ``dead``)."""
    await ensure_group(redis, STREAM, group)
    await publish_envelope(redis, STREAM, Envelope(role="user", content=content))
    reply = await redis.xreadgroup(group, "dead", {STREAM: ">"}, count=1)
    return reply[0][1][0][0]  # type: ignore[no-any-return]


async def reader_blocked(redis: Any) -> bool:
    """True while some client is parked in a blocking XREADGROUP (CLIENT LIST flag b)."""
    clients = await redis.client_list()
    return any(
        "b" in str(c.get("flags", "")) and "xreadgroup" in str(c.get("cmd")) for c in clients
    )


async def command_calls(redis: Any, name: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_check_pending_processes_claimed_entry_without_new_traffic(redis: Any) -> None:
    """After check_pending(), an entry claimed to us is handled at once, though the reader
    is parked in a long blocking read and the periodic check is far away."""
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(str(env.content))

    entry_id = await orphan(redis, "g", "orphan")
    sub = await subscribe(
        redis, STREAM, handler, group="g", block_ms=60_000, pending_check_interval=60
    )
    await sub.started()
    await eventually(lambda: reader_blocked(redis), timeout=5, message="reader blocked")
    await redis.xclaim(STREAM, "g", sub.consumer, 0, [entry_id])
    sub.check_pending()
    await eventually(lambda: sub.stats.processed == 1, timeout=5)
    assert seen == ["orphan"]
    assert int((await redis.xpending(STREAM, "g"))["pending"]) == 0
    # the reader still works after being interrupted
    await publish_envelope(redis, STREAM, Envelope(role="user", content="fresh"))
    await eventually(lambda: sub.stats.processed == 2, timeout=5)
    await sub.stop()


async def test_periodic_check_finds_claimed_entries(redis: Any) -> None:
    """Without a nudge, the periodic own-pending check picks claimed entries up."""
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(str(env.content))

    entry_id = await orphan(redis, "g", "later")
    sub = await subscribe(
        redis, STREAM, handler, group="g", block_ms=60_000, pending_check_interval=0.1
    )
    await sub.started()
    await eventually(lambda: reader_blocked(redis), timeout=5, message="reader blocked")
    await redis.xclaim(STREAM, "g", sub.consumer, 0, [entry_id])
    await eventually(lambda: seen == ["later"], timeout=5)
    await sub.stop()


async def test_idle_check_costs_one_xpending(redis: Any) -> None:
    """An idle subscription's periodic check is one XPENDING: no XRANGE, no XCLAIM."""

    async def handler(env: Envelope) -> None:
        pass

    sub = await subscribe(
        redis, STREAM, handler, group="g", block_ms=60_000, pending_check_interval=0.05
    )
    await sub.started()
    before = {n: await command_calls(redis, n) for n in ("xpending", "xrange", "xclaim")}

    async def checks_done() -> bool:
        return await command_calls(redis, "xpending") >= before["xpending"] + 4

    await eventually(checks_done, timeout=10)
    assert await command_calls(redis, "xrange") == before["xrange"]
    assert await command_calls(redis, "xclaim") == before["xclaim"]
    await sub.stop()


async def test_claimed_entry_past_the_limit_is_dead_lettered_unrun(redis: Any) -> None:
    """A claimed entry whose counter is already past max_deliveries never reaches the handler."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1

    entry_id = await orphan(redis, "g", "poison")
    sub = await subscribe(redis, STREAM, handler, group="g", max_deliveries=1)
    await sub.started()
    await redis.xclaim(STREAM, "g", sub.consumer, 0, [entry_id])  # counter now 2
    sub.check_pending()
    await eventually(lambda: sub.stats.dead_lettered == 1, timeout=5)
    await sub.stop()
    assert calls == 0
    assert int((await redis.xpending(STREAM, "g"))["pending"]) == 0


@pytest.mark.timeout(60)
async def test_frequent_checks_under_load_never_double_process(redis: Any) -> None:
    """Own-pending checks racing with batched acks never hand an entry to the handler twice."""
    from core_bus import publish_many

    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.envelope_id)

    total = 5000
    await publish_many(redis, STREAM, [Envelope(role="user") for _ in range(total)])
    sub = await subscribe(redis, STREAM, handler, group="g", pending_check_interval=0.001)
    await eventually(lambda: sub.stats.processed == total, timeout=40)
    await sub.stop()
    assert len(seen) == total and len(set(seen)) == total
