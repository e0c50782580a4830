"""The idle sweep never hands an idle entry back to the consumer that holds it.

XAUTOCLAIM cannot exclude the owner: a sweep that picked the hung consumer as
the receiver would "move" its entries to itself, bump their delivery counters
and, sweep after sweep, dead-letter healthy entries while the handler hangs.
"""

from __future__ import annotations

from typing import Any

import pytest

from core_bus.keys import StreamKeyBuilder
from supervisor.delivery.consumers import pending_entries
from supervisor.delivery.rebalance import GroupTarget, Rebalancer
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

KEYS = StreamKeyBuilder()
STREAM = KEYS.agent_inbox("sweepy")
GROUP = "sweepy"


def make_target(max_deliveries: int = 3) -> GroupTarget:
    return GroupTarget(
        agent="sweepy",
        group=GROUP,
        streams=(STREAM,),
        max_deliveries=max_deliveries,
        claim_idle=0.15,
        dlq_stream=KEYS.dead_letter(GROUP),
    )


async def take(redis: Any, consumer: str, count: int) -> None:
    """Deliver ``count`` new entries to ``consumer`` and never ack them (a hung handler)."""
    await redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)


async def owners(redis: Any) -> dict[str, tuple[str, int]]:
    rows = await pending_entries(redis, STREAM, GROUP, count=1000)
    return {row.id: (row.consumer, row.deliveries) for row in rows}


async def all_idle(redis: Any) -> bool:
    rows = await pending_entries(redis, STREAM, GROUP, count=1000, min_idle_ms=150)
    total = await pending_entries(redis, STREAM, GROUP, count=1000)
    return len(rows) == len(total) > 0


async def seed(redis: Any, n: int) -> None:
    for i in range(n):
        await redis.xadd(STREAM, {"data": str(i)})
    await redis.xgroup_create(STREAM, GROUP, id="0")


@pytest.mark.timeout(30)
async def test_hung_consumer_entries_go_to_a_sibling(redis: Any) -> None:
    """Entries idle in a live-but-hung consumer move to the other live consumer."""
    await seed(redis, 6)
    await take(redis, "hung", 6)
    await redis.xgroup_createconsumer(STREAM, GROUP, "ok")
    await eventually(lambda: all_idle(redis), timeout=10, message="entries idle")
    reb = Rebalancer(redis, KEYS, "sup")
    for _ in range(3):  # several sweeps: the receiver choice must never be "hung"
        moved = await reb.sweep(make_target(), ["hung", "ok"])
        assert "hung" not in moved
    held = await owners(redis)
    assert {owner for owner, _ in held.values()} == {"ok"}
    assert {count for _, count in held.values()} == {2}  # one real redelivery each
    assert await redis.xlen(KEYS.dead_letter(GROUP)) == 0


@pytest.mark.timeout(30)
async def test_mixed_owners_swap_and_a_sole_owner_keeps_its_entries(redis: Any) -> None:
    """When every live consumer holds idle entries, each entry goes to another one;
    a consumer that is the only live one keeps its entries (no pointless redelivery)."""
    await seed(redis, 4)
    await take(redis, "a", 2)
    await take(redis, "b", 2)
    before = await owners(redis)
    await eventually(lambda: all_idle(redis), timeout=10, message="entries idle")
    reb = Rebalancer(redis, KEYS, "sup")
    await reb.sweep(make_target(), ["a", "b"])
    after = await owners(redis)
    for entry_id, (owner, deliveries) in after.items():
        assert owner != before[entry_id][0]
        assert deliveries == 2
    await eventually(lambda: all_idle(redis), timeout=10, message="entries idle again")
    await reb.sweep(make_target(), ["a"])  # "a" alone: b's entries move to a, a's stay
    final = await owners(redis)
    assert {owner for owner, _ in final.values()} == {"a"}
    assert sorted(d for _, d in final.values()) == [2, 2, 3, 3]
