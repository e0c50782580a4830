"""Handler failures, retries by the Redis delivery counter, dead letters, malformed entries."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from core_bus import DeadLetter, Envelope, StreamKeyBuilder, publish_envelope, subscribe
from core_bus.streams.deadletter import (
    REASON_BAD_JSON,
    REASON_BAD_UTF8,
    REASON_NO_DATA,
    REASON_NOT_ENVELOPE,
    REASON_POISON,
    REASON_TOO_LARGE,
)
from core_bus.streams.replies import entries_of
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

STREAM = "AG1:agent:fail:inbox"
FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}


async def dead_letters(redis: Any, group: str) -> list[DeadLetter]:
    raw = await redis.xrange(StreamKeyBuilder().dead_letter(group))
    return [DeadLetter.from_fields(i, f) for i, f in entries_of(raw) if f is not None]


async def pending(redis: Any, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def test_fails_twice_then_succeeds(redis: Any) -> None:
    """A handler failing twice then succeeding: processed once, acked, nothing dead-lettered."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError(f"attempt {calls}")

    await publish_envelope(redis, STREAM, Envelope(role="user"))
    sub = await subscribe(redis, STREAM, handler, group="g", max_deliveries=3, **FAST)
    await eventually(lambda: sub.stats.processed == 1)
    await sub.stop()
    assert calls == 3 and sub.stats.failed == 2 and sub.stats.dead_lettered == 0
    assert await pending(redis, STREAM, "g") == 0
    assert await dead_letters(redis, "g") == []


async def test_always_failing_is_dead_lettered_after_max_deliveries(redis: Any) -> None:
    """Exactly max_deliveries handler runs, then one dead letter with the full reason, acked."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    entry_id = await publish_envelope(redis, STREAM, Envelope(role="user", content="x"))
    raw = (await redis.xrange(STREAM))[0][1][b"data"]
    sub = await subscribe(redis, STREAM, handler, group="g", max_deliveries=3, **FAST)
    await eventually(lambda: sub.stats.dead_lettered == 1)
    await sub.stop()
    assert calls == 3 and sub.stats.failed == 3
    [dead] = await dead_letters(redis, "g")
    assert dead.reason == REASON_POISON
    assert dead.error == "ValueError: boom"
    assert dead.deliveries == 3
    assert (dead.source_stream, dead.source_id, dead.group) == (STREAM, entry_id, "g")
    assert dead.consumer == sub.consumer and dead.dead_lettered_at
    assert dead.data == raw
    assert await pending(redis, STREAM, "g") == 0


@pytest.mark.parametrize("stop_during_call", [1, 2, 3])
async def test_max_deliveries_survive_a_restart(redis: Any, stop_during_call: int) -> None:
    """The limit counts deliveries in Redis: a worker restarted (same consumer name) between
    attempts still runs the handler exactly max_deliveries times in total.

    The first worker fails every call before ``stop_during_call`` and is stopped
    while that call is still running (like a crash mid-handler)."""
    calls = 0
    entered = anyio.Event()

    async def first(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        if calls == stop_during_call:
            entered.set()
            await anyio.sleep_forever()
        raise RuntimeError("first worker")

    async def second(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("second worker")

    await publish_envelope(redis, STREAM, Envelope(role="user"))
    sub = await subscribe(
        redis, STREAM, first, group="g", consumer="host:w:0", max_deliveries=3, **FAST
    )
    with anyio.fail_after(10):
        await entered.wait()
    await sub.stop(drain_timeout=0)
    assert calls == stop_during_call
    again = await subscribe(
        redis, STREAM, second, group="g", consumer="host:w:0", max_deliveries=3, **FAST
    )
    await eventually(lambda: again.stats.dead_lettered == 1)
    await again.stop()
    assert calls == 3
    [dead] = await dead_letters(redis, "g")
    assert dead.reason == REASON_POISON and dead.deliveries >= 3
    assert await pending(redis, STREAM, "g") == 0


async def test_restart_during_backoff_keeps_count(redis: Any) -> None:
    """Stopped while an entry waits for its retry: the next incarnation finishes the count."""
    calls = 0

    async def handler(env: Envelope) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("nope")

    await publish_envelope(redis, STREAM, Envelope(role="user"))
    slow = await subscribe(
        redis, STREAM, handler, group="g", consumer="c1", max_deliveries=3, retry_backoff=30
    )
    await eventually(lambda: slow.stats.failed == 1)
    await slow.stop()
    fast = await subscribe(
        redis, STREAM, handler, group="g", consumer="c1", max_deliveries=3, **FAST
    )
    await eventually(lambda: fast.stats.dead_lettered == 1)
    await fast.stop()
    assert calls == 3


async def test_malformed_entries_are_dead_lettered_and_consumption_continues(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each kind of malformed entry goes to the DLQ at once with its reason; valid ones flow."""
    monkeypatch.setenv("BUS_MAX_ENVELOPE_BYTES", "2048")
    from core_bus.settings import get_settings

    get_settings.cache_clear()
    good = Envelope(role="user", content="ok").to_json()
    big = Envelope(role="user", content="x" * 3000).to_json()
    cases = {
        REASON_NO_DATA: {"other": "field"},
        REASON_BAD_UTF8: {"data": b'{"role": "\xff\xfe"}'},
        REASON_BAD_JSON: {"data": b"{not json"},
        REASON_NOT_ENVELOPE: {"data": b'{"no_role": 1}'},
        REASON_TOO_LARGE: {"data": big},
    }
    ids = {reason: await redis.xadd(STREAM, fields) for reason, fields in cases.items()}
    list_id = await redis.xadd(STREAM, {"data": b"[1, 2]"})
    await redis.xadd(STREAM, {"data": good})
    await redis.xadd(STREAM, {"envelope": good})  # the prototype's field name is accepted
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.content)

    sub = await subscribe(redis, STREAM, handler, group="g")
    await eventually(lambda: sub.stats.processed == 2 and sub.stats.dead_lettered == 6)
    await sub.stop()
    assert seen == ["ok", "ok"] and sub.stats.malformed == 6 and sub.stats.failed == 0
    by_id = {d.source_id: d for d in await dead_letters(redis, "g")}
    for reason, entry_id in ids.items():
        assert by_id[entry_id.decode()].reason == reason
        assert by_id[entry_id.decode()].error
    assert by_id[list_id.decode()].reason == REASON_NOT_ENVELOPE
    assert by_id[ids[REASON_BAD_JSON].decode()].data == b"{not json"
    assert await pending(redis, STREAM, "g") == 0


async def test_deleted_pending_entries_are_acked_not_crashed_on(redis: Any) -> None:
    """Entries deleted while pending come back as nil from history: acked, nothing else."""
    entered = 0

    async def stuck(env: Envelope) -> None:
        nonlocal entered
        entered += 1
        await anyio.sleep_forever()

    ids = [
        await publish_envelope(redis, STREAM, Envelope(role="user", content=i)) for i in range(4)
    ]
    sub = await subscribe(redis, STREAM, stuck, group="g", consumer="c", concurrency=4)
    await eventually(lambda: entered == 4)
    await sub.stop(drain_timeout=0)
    await redis.xdel(STREAM, ids[0], ids[2])
    seen: list[int] = []

    async def handler(env: Envelope) -> None:
        seen.append(int(env.content))

    again = await subscribe(redis, STREAM, handler, group="g", consumer="c")
    await eventually(lambda: again.stats.processed == 2)
    await again.stop()
    assert sorted(seen) == [1, 3]
    assert await pending(redis, STREAM, "g") == 0
    assert await dead_letters(redis, "g") == [] and again.stats.dead_lettered == 0


async def test_group_destroyed_under_a_running_subscription_is_recreated(redis: Any) -> None:
    """If the group vanishes (XGROUP DESTROY, or a Redis that lost its data) the subscription
    recreates it and keeps consuming instead of failing."""
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.content)

    sub = await subscribe(redis, STREAM, handler, group="g", block_ms=200)
    await sub.started()
    await publish_envelope(redis, STREAM, Envelope(role="user", content=1))
    await eventually(lambda: seen == [1])
    await redis.xgroup_destroy(STREAM, "g")
    await publish_envelope(redis, STREAM, Envelope(role="user", content=2))
    await eventually(lambda: 2 in seen, timeout=10)
    assert sub.running
    await sub.stop()
