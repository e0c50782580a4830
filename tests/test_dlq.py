"""Dead-letter tools (core_bus.tools.dlq) on dead letters written by a real subscription."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from core_bus.consume.subscription import subscribe
from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import DATA_FIELD, publish_envelope
from core_bus.streams.groups import UnknownStream
from core_bus.streams.replies import entries_of
from core_bus.tools.dlq import (
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    resolve_target,
)
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

KB = StreamKeyBuilder()
INBOX = KB.agent_inbox("dlqtest")
GROUP = "dlqtest"
DLQ = KB.dead_letter(GROUP)


async def make_dead_letters(redis: Any, good: int = 3) -> None:
    """``good`` envelopes whose handler always fails (poison) plus one malformed entry,
    all dead-lettered by a real subscription, which is then stopped."""
    for i in range(good):
        await publish_envelope(redis, INBOX, Envelope(role="user", content=i))
    await redis.xadd(INBOX, {DATA_FIELD: b"{broken"})

    async def always_fails(env: Envelope) -> None:
        raise RuntimeError(f"cannot handle {env.content}")

    sub = await subscribe(
        redis,
        INBOX,
        always_fails,
        GROUP,
        max_deliveries=2,
        retry_backoff=0.01,
        retry_backoff_max=0.02,
        pending_check_interval=0.05,
    )
    try:
        await eventually(lambda: _xlen_is(redis, DLQ, good + 1), timeout=20, message="DLQ")
    finally:
        await sub.stop(drain_timeout=2)


async def _xlen_is(redis: Any, key: str, n: int) -> bool:
    return int(await redis.xlen(key)) == n


async def test_resolve_by_dlq_group_and_source_stream(redis: Any) -> None:
    """A target may be the dead-letter stream, the group/agent name, or the source stream
    (then only its entries count); anything else is UnknownStream."""
    await make_dead_letters(redis)
    await redis.xadd(DLQ, {"data": b"{}", "reason": "x", "source_stream": "AG1:other"})
    by_dlq = await resolve_target(redis, DLQ)
    by_group = await resolve_target(redis, GROUP)
    by_source = await resolve_target(redis, INBOX)
    assert by_dlq.streams == by_group.streams == by_source.streams == [DLQ]
    assert len(await list_dead_letters(redis, by_group)) == 5
    from_inbox = await list_dead_letters(redis, by_source)
    assert len(from_inbox) == 4
    reasons = sorted(letter.reason for _dlq, letter in from_inbox)
    assert reasons == ["invalid_json", "max_deliveries", "max_deliveries", "max_deliveries"]
    with pytest.raises(UnknownStream):
        await resolve_target(redis, "nobody")
    with pytest.raises(UnknownStream):
        await resolve_target(redis, KB.dead_letter("missing"))


async def test_replay_readds_with_count_and_removes(redis: Any) -> None:
    """Replay re-adds each envelope to its source stream with meta.dlq_replays counting
    replays, removes it from the DLQ only then, and skips (keeps) the malformed one."""
    await make_dead_letters(redis)
    before = len(entries_of(await redis.xrange(INBOX)))
    result = await replay_dead_letters(redis, await resolve_target(redis, GROUP))
    assert len(result.replayed) == 3
    assert len(result.skipped) == 1 and "not an Envelope" in result.skipped[0][2]
    inbox = entries_of(await redis.xrange(INBOX))
    assert len(inbox) == before + 3
    replayed = [Envelope.from_json(f[DATA_FIELD]) for _i, f in inbox[before:]]
    assert sorted(e.content for e in replayed) == [0, 1, 2]
    assert {e.meta["dlq_replays"] for e in replayed} == {1}
    assert {e.meta["dlq_last_reason"] for e in replayed} == {"max_deliveries"}
    remaining = await list_dead_letters(redis, await resolve_target(redis, GROUP))
    assert [letter.reason for _d, letter in remaining] == ["invalid_json"]


async def test_replay_count_grows_across_rounds(redis: Any) -> None:
    """A replayed envelope that dies again and is replayed again carries dlq_replays=2."""
    letter_env = Envelope(role="user", content="again", meta={"dlq_replays": 1})
    await redis.xadd(
        DLQ,
        {"data": letter_env.to_json(), "reason": "max_deliveries", "source_stream": INBOX},
    )
    target = await resolve_target(redis, DLQ)
    result = await replay_dead_letters(redis, target)
    assert len(result.replayed) == 1
    ((_id, fields),) = entries_of(await redis.xrange(INBOX))
    assert fields is not None
    assert Envelope.from_json(fields[DATA_FIELD]).meta["dlq_replays"] == 2


async def test_concurrent_replays_replay_each_entry_once(redis: Any) -> None:
    """Two operators replaying the same dead letters at once re-add each entry once."""
    for i in range(20):
        await redis.xadd(
            DLQ,
            {
                "data": Envelope(role="user", content=i).to_json(),
                "reason": "max_deliveries",
                "source_stream": INBOX,
            },
        )
    target = await resolve_target(redis, DLQ)
    results: list[Any] = []

    async def replay() -> None:
        results.append(await replay_dead_letters(redis, target))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        tg.start_soon(replay)
    assert sum(len(r.replayed) for r in results) == 20
    assert int(await redis.xlen(INBOX)) == 20
    assert int(await redis.xlen(DLQ)) == 0


async def test_replay_selected_ids_and_missing_id(redis: Any) -> None:
    """Replay by id touches only that entry; an unknown id is reported as skipped."""
    ids = [
        await redis.xadd(
            DLQ,
            {"data": Envelope(role="user", content=i).to_json(), "source_stream": INBOX},
        )
        for i in range(3)
    ]
    chosen = ids[1].decode()
    result = await replay_dead_letters(redis, await resolve_target(redis, DLQ), [chosen, "9-9"])
    assert [i for _d, i, _n in result.replayed] == [chosen]
    assert [(i, why) for _d, i, why in result.skipped] == [("9-9", "no such dead letter")]
    assert int(await redis.xlen(DLQ)) == 2


async def test_purge_deletes_only_listed_ids(redis: Any) -> None:
    """Purge deletes the dead letters it was given (or all current ones); an entry that
    arrives after the operator looked is kept."""
    await make_dead_letters(redis, good=2)
    target = await resolve_target(redis, GROUP)
    seen = [letter.id for _d, letter in await list_dead_letters(redis, target)]
    late = (await redis.xadd(DLQ, {"data": b"{}", "reason": "late"})).decode()
    assert await purge_dead_letters(redis, target, seen) == 3
    assert [letter.id for _d, letter in await list_dead_letters(redis, target)] == [late]
    assert await purge_dead_letters(redis, target) == 1
    assert int(await redis.xlen(DLQ)) == 0
