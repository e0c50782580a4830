"""Crash suspects run alone, blame goes only to the entry a worker died running alone,
handler timeouts and stuck handlers, leases, dead letters that keep every field (issue 13).

Library level against a real redis-server: the dead consumer is simulated by reading
entries with another consumer name (what a SIGKILLed worker leaves behind), and the
supervisor's real Rebalancer does the crash reclaim.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from core_bus import DeadLetter, Envelope, StreamKeyBuilder, publish_many, subscribe
from core_bus.consume.suspects import suspect_field
from core_bus.streams.deadletter import REASON_CRASHED, REASON_NO_DATA, REASON_TIMEOUT
from core_bus.streams.replies import entries_of, text
from core_bus.tools.dlq import DlqTarget, replay_dead_letters
from supervisor.delivery.rebalance import GroupTarget, Rebalancer
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

STREAM = "AG1:agent:iso:inbox"
GROUP = "iso"
KEYS = StreamKeyBuilder()
FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.05, "pending_check_interval": 0.2}


def target(max_deliveries: int = 5) -> GroupTarget:
    return GroupTarget(
        agent="iso",
        group=GROUP,
        streams=(STREAM,),
        max_deliveries=max_deliveries,
        claim_idle=15.0,
        dlq_stream=KEYS.dead_letter(GROUP),
        suspects_key=KEYS.suspects(GROUP),
    )


async def dead_letters(redis: Any) -> list[DeadLetter]:
    raw = await redis.xrange(KEYS.dead_letter(GROUP))
    return [DeadLetter.from_fields(i, f) for i, f in entries_of(raw) if f is not None]


async def leave_pending(redis: Any, n: int, consumer: str = "dead") -> list[str]:
    """Publish ``n`` envelopes and read them as ``consumer`` (never acked): a dead worker's PEL."""
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await publish_many(redis, STREAM, [Envelope(role="user", content=i) for i in range(n)])
    await redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=n)
    rows = await redis.xpending_range(STREAM, GROUP, "-", "+", n, consumer)
    return [text(row["message_id"]) for row in rows]


async def delivered(redis: Any, entry_id: str) -> int:
    rows = await redis.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
    return int(rows[0]["times_delivered"]) if rows else 0


async def test_crash_reclaim_counts_no_delivery_and_suspects_run_alone(redis: Any) -> None:
    """A dead consumer's 30 entries: claimed without counting a delivery, marked suspects;
    the receiver (concurrency 8) runs each alone, with the isolation mark set in Redis."""
    ids = await leave_pending(redis, 30)
    running = 0
    overlaps: list[int] = []
    marks: list[str | None] = []
    handled: list[Any] = []

    async def handler(env: Envelope, r: Any) -> None:
        nonlocal running
        running += 1
        overlaps.append(running)
        await anyio.sleep(0.005)
        handled.append(env.content)
        running -= 1

    sub = await subscribe(
        redis,
        STREAM,
        handler,
        group=GROUP,
        consumer="live",
        concurrency=8,
        **{**FAST, "pending_check_interval": 60.0},
    )
    try:
        await sub.started()
        rebalancer = Rebalancer(redis, KEYS, "t")
        moved = await rebalancer.reclaim_dead(target(), "dead", ["live"], exit_reason="exit 1")
        assert moved == {"live": 30}
        assert [await delivered(redis, i) for i in ids[:3]] == [1, 1, 1]  # JUSTID: no count
        marks = [
            None if v is None else v.decode()
            for v in await redis.hmget(
                KEYS.suspects(GROUP), [suspect_field(STREAM, i) for i in ids]
            )
        ]
        assert marks == [""] * 30
        sub.check_pending()
        await eventually(lambda: sub.stats.processed == 30, timeout=20)
    finally:
        await sub.stop()
    assert max(overlaps) == 1, "a suspect ran beside another handler"
    assert sorted(handled) == list(range(30))
    assert sub.stats.isolated == 30
    assert await redis.hlen(KEYS.suspects(GROUP)) == 0  # cleared after each isolated run


async def test_only_the_entry_run_alone_is_blamed(redis: Any) -> None:
    """The dead consumer was running one suspect alone: only it gets a counted delivery;
    at max_deliveries it is dead-lettered as worker_crashed with the exit status."""
    ids = await leave_pending(redis, 5)
    key = KEYS.suspects(GROUP)
    await redis.hset(key, suspect_field(STREAM, ids[2]), "dead")
    rebalancer = Rebalancer(redis, KEYS, "t")
    await rebalancer.reclaim_dead(target(), "dead", ["live"], exit_reason="signal SIGSEGV")
    assert [await delivered(redis, i) for i in ids] == [1, 1, 2, 1, 1]
    # the same entry dies with its runner again and again: dead-lettered at the limit
    for round_ in range(4):
        await redis.hset(key, suspect_field(STREAM, ids[2]), f"live{round_}")
        await redis.xclaim(STREAM, GROUP, f"live{round_}", 0, [ids[2]], justid=True)
        await rebalancer.reclaim_dead(
            target(), f"live{round_}", [f"live{round_ + 1}"], exit_reason="exit 1"
        )
    [letter] = await dead_letters(redis)
    assert (letter.reason, letter.source_id, letter.deliveries) == (REASON_CRASHED, ids[2], 5)
    assert "exit 1" in letter.error and "5 attempts" in letter.error
    assert [await delivered(redis, i) for i in ids if i != ids[2]] == [1, 1, 1, 1]


async def test_handler_timeout_cancels_retries_then_dead_letters(redis: Any) -> None:
    """A handler that hangs is cancelled at handler_timeout (a failed attempt), retried,
    dead-lettered as handler_timeout; healthy entries around it are processed."""
    started: list[Any] = []

    async def handler(env: Envelope) -> None:
        started.append(env.content)
        if env.content == "hang":
            await anyio.sleep(10**6)

    envs = [Envelope(role="user", content=i) for i in range(5)]
    envs.insert(2, Envelope(role="user", content="hang"))
    await publish_many(redis, STREAM, envs)
    sub = await subscribe(
        redis, STREAM, handler, group=GROUP, max_deliveries=3, handler_timeout=0.3, **FAST
    )
    try:
        await eventually(
            lambda: sub.stats.dead_lettered == 1 and sub.stats.processed == 5, timeout=20
        )
    finally:
        await sub.stop()
    [letter] = await dead_letters(redis)
    assert letter.reason == REASON_TIMEOUT and letter.deliveries == 3
    assert "HandlerTimeout" in letter.error
    assert started.count("hang") == 3 and sub.stats.failed == 3


async def test_handler_ignoring_cancellation_is_reported_stuck(redis: Any) -> None:
    """A handler swallowing its cancellation past handler_timeout_grace: stats.stuck and
    on_stuck report it (the built-in worker turns that into a replacement)."""
    release = anyio.Event()
    reports: list[int] = []

    async def handler(env: Envelope) -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue  # a badly written handler

    await publish_many(redis, STREAM, [Envelope(role="user", content="x")])
    sub = await subscribe(
        redis, STREAM, handler, group=GROUP, handler_timeout=0.2, handler_timeout_grace=0.3, **FAST
    )
    sub.on_stuck = reports.append
    try:
        await eventually(lambda: reports == [1], timeout=10)
        assert sub.stats.stuck == 1
        release.set()
        await eventually(lambda: reports == [1, 0], timeout=10)
    finally:
        release.set()
        await sub.stop()


async def test_held_entries_are_leased_so_a_sweep_cannot_take_them(redis: Any) -> None:
    """Handlers three times longer than claim_idle: their entries stay fresh, so an
    XAUTOCLAIM sweep with min-idle claim_idle never takes them; each runs once. (Entries
    queued behind handlers that fill every slot that long are let go on purpose: see
    test_run_delivery's stalled-worker test.)"""
    runs: list[Any] = []

    async def handler(env: Envelope) -> None:
        runs.append(env.content)
        await anyio.sleep(1.5)

    await publish_many(redis, STREAM, [Envelope(role="user", content=i) for i in range(3)])
    sub = await subscribe(
        redis, STREAM, handler, group=GROUP, concurrency=4, claim_idle=0.5, **FAST
    )
    stolen: list[Any] = []
    try:
        await eventually(lambda: len(runs) == 3, timeout=10)
        with anyio.fail_after(20):
            await _sweep_until(redis, lambda: sub.stats.processed == 3, stolen)
    finally:
        await sub.stop()
    assert stolen == [] and sorted(runs) == [0, 1, 2]


async def _sweep_until(redis: Any, done: Any, stolen: list[Any]) -> None:
    """What a sweep with claim_idle 500 ms would take, every 100 ms, until ``done()``."""
    while not done():
        reply = await redis.xautoclaim(STREAM, GROUP, "thief", 500, "0-0", count=100)
        stolen.extend(reply[1])
        await anyio.sleep(0.1)


async def test_dead_letter_keeps_every_original_field_and_replays_them(redis: Any) -> None:
    """An entry without data/envelope: its fields (binary too) are kept and replayed."""

    async def handler(env: Envelope) -> None:
        raise AssertionError("never called")

    fields = {b"kind": b"legacy", b"blob": b"\xff\x00\xfe", b"n": b"42"}
    entry_id = (await redis.xadd(STREAM, fields)).decode()
    sub = await subscribe(redis, STREAM, handler, group=GROUP, **FAST)
    try:
        await eventually(lambda: sub.stats.dead_lettered == 1)
    finally:
        await sub.stop()
    [letter] = await dead_letters(redis)
    assert letter.reason == REASON_NO_DATA and letter.source_id == entry_id
    assert letter.original == {k.decode(): v for k, v in fields.items()}
    result = await replay_dead_letters(redis, DlqTarget([KEYS.dead_letter(GROUP)]))
    [(_dlq, _old, new_id)] = result.replayed
    [(_, replayed)] = entries_of(await redis.xrange(STREAM, new_id, new_id))
    assert replayed == {k.decode(): v for k, v in fields.items()}


async def test_dead_letter_maxlen_trims_and_counts(redis: Any) -> None:
    """dead_letter_maxlen bounds the dead-letter stream; dropped letters are counted."""

    async def handler(env: Envelope) -> None:
        raise AssertionError("never called")

    async with redis.pipeline(transaction=False) as pipe:
        for i in range(400):
            pipe.xadd(STREAM, {"data": f"not json {i}"})
        await pipe.execute()
    sub = await subscribe(redis, STREAM, handler, group=GROUP, dead_letter_maxlen=50, **FAST)
    try:
        await eventually(lambda: sub.stats.dead_lettered == 400, timeout=20)
    finally:
        await sub.stop()
    length = await redis.xlen(KEYS.dead_letter(GROUP))
    assert length < 400 and sub.stats.dlq_trimmed == 400 - length


async def test_a_drained_workers_leftovers_are_no_suspects(redis: Any) -> None:
    """A worker that exited 0 after a drain (rolling restart, scale down) crashed on
    nothing: its read-ahead moves without a delivery counted and without suspect marks,
    so the receiver runs it concurrently, not one entry at a time."""
    ids = await leave_pending(redis, 20)
    running = 0
    overlaps: list[int] = []

    async def handler(env: Envelope, r: Any) -> None:
        nonlocal running
        running += 1
        overlaps.append(running)
        await anyio.sleep(0.05)
        running -= 1

    sub = await subscribe(
        redis,
        STREAM,
        handler,
        group=GROUP,
        consumer="live",
        concurrency=8,
        **{**FAST, "pending_check_interval": 60.0},
    )
    try:
        await sub.started()
        rebalancer = Rebalancer(redis, KEYS, "t")
        moved = await rebalancer.reclaim_dead(target(), "dead", ["live"], reason="exit")
        assert moved == {"live": 20}
        assert [await delivered(redis, i) for i in ids[:3]] == [1, 1, 1]  # JUSTID: no count
        assert await redis.hlen(KEYS.suspects(GROUP)) == 0
        sub.check_pending()
        await eventually(lambda: sub.stats.processed == 20, timeout=20)
    finally:
        await sub.stop()
    assert sub.stats.isolated == 0
    assert max(overlaps) > 1, "a drained worker's entries were run one at a time"


async def test_acks_of_entries_lost_to_the_sweep_leave_no_empty_xack(redis: Any) -> None:
    """A resumed worker drops the acks of entries the sweep gave away; when that was
    every ack of a stream, the flush sends nothing for it (an XACK without ids is an
    error reply that used to kill the worker) and acks the rest."""
    import structlog

    from core_bus.consume.acks import AckBatcher
    from core_bus.consume.held import HeldEntries
    from core_bus.consume.stats import SubscriptionStats
    from core_bus.streams.connwatch import ConnectionWatch

    ids = await leave_pending(redis, 2, consumer="me")
    other = "AG1:agent:iso:other"
    stats = SubscriptionStats()
    held = HeldEntries([STREAM, other])
    acks = AckBatcher(redis, GROUP, held, stats, ConnectionWatch(structlog.get_logger(), stats))
    acks.add(STREAM, ids[0], True)
    acks.pending[other] = []  # what dropping the only ack of a stream used to leave
    assert await acks.flush()
    assert [await delivered(redis, i) for i in ids] == [0, 1]  # ids[0] acked, ids[1] kept
