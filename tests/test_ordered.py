"""Ordered shards: one owner per shard (Redis leases), per-key order across failover and scaling.

Each handler records ``(key, seq)`` by RPUSH to ``seen:<key>``; order holds when
every key's list, with adjacent repeats collapsed (an entry whose owner was
SIGKILLed after the handler ran but before the ack is handled again by the next
owner: at-least-once), is exactly ``0, 1, 2, ...``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder, shard_for
from core_bus.ordered import (
    OrderedSubscription,
    assigned,
    evict_consumer,
    members_key,
    shard_units,
    subscribe_ordered,
)
from core_bus.publish import publish_envelope
from core_bus.streams.replies import text
from tests.fleet_harness import FleetProcess
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

KEYS = StreamKeyBuilder()
BASE = KEYS.agent_inbox("ledger")
GROUP = "ledger"
SHARDS = 4
KEY_NAMES = [f"acct-{i}" for i in range(12)]

WORKER = """
import asyncio, sys
import redis.asyncio as R
from core_bus.ordered import subscribe_ordered

url, base, shards, group, consumer, ttl = sys.argv[1:7]

async def handler(env, redis):
    await redis.rpush("seen:" + env.meta["key"], env.meta["seq"])
    await asyncio.sleep(0.005)

async def main():
    r = R.Redis.from_url(url)
    sub = await subscribe_ordered(r, [base], int(shards), handler, group, consumer,
                                  lease_ttl=float(ttl))
    await sub.started()
    await r.rpush("ready", consumer)
    await sub.wait()

asyncio.run(main())
"""


async def record(env: Envelope, redis: Any) -> None:
    await redis.rpush("seen:" + env.meta["key"], env.meta["seq"])


async def publish_keyed(redis: Any, start: int, stop: int) -> None:
    """Publish seq ``start..stop-1`` for every key, routed to its shard."""
    for seq in range(start, stop):
        for key in KEY_NAMES:
            env = Envelope(role="user", content="x", meta={"key": key, "seq": seq})
            await publish_envelope(redis, KEYS.route(BASE, key, SHARDS), env)


async def order_report(redis: Any, total: int) -> tuple[bool, int]:
    """(every key saw 0..total-1 in order, number of adjacent repeats)."""
    dupes = 0
    for key in KEY_NAMES:
        seen = [int(text(v)) for v in await redis.lrange("seen:" + key, 0, -1)]
        collapsed = [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]]
        dupes += len(seen) - len(collapsed)
        if collapsed != list(range(total)):
            return False, dupes
    return True, dupes


async def llen_at_least(redis: Any, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n


async def all_seen(redis: Any, total: int) -> bool:
    for key in KEY_NAMES:
        if await redis.llen("seen:" + key) < total:
            return False
    return True


async def nothing_pending(redis: Any) -> bool:
    for stream in KEYS.shard_streams(BASE, SHARDS):
        if int((await redis.xpending(stream, GROUP))["pending"]):
            return False
    return True


async def start_sub(
    redis: Any, consumer: str, handler: Any = record, **kw: Any
) -> OrderedSubscription:
    kw.setdefault("lease_ttl", 1.0)
    sub = await subscribe_ordered(redis, [BASE], SHARDS, handler, GROUP, consumer, **kw)
    await sub.started()
    return sub


def test_assignment_is_deterministic_and_fair() -> None:
    """Every member computes the same owner per shard; shares differ by at most one."""
    units = shard_units(KEYS, GROUP, [BASE, KEYS.agent_inbox("other")], 5)
    members = ["c", "a", "b"]
    shares = [assigned(units, members, m) for m in members]
    assert set().union(*shares) == set(units)
    assert sum(len(s) for s in shares) == len(units)
    assert sorted(len(s) for s in shares) == [3, 3, 4]
    assert shard_for("acct-1", 4) == shard_for(b"acct-1", 4)


@pytest.mark.timeout(60)
async def test_two_consumers_split_shards_and_keep_order(redis: Any) -> None:
    """Two live consumers own disjoint halves of the shards; per-key order holds; stop()
    releases every lease and leaves the membership."""
    a = await start_sub(redis, "a")
    b = await start_sub(redis, "b")
    try:
        await eventually(
            lambda: len(a.owned()) == 2 and len(b.owned()) == 2, 10, message="2+2 shards"
        )
        assert set(a.owned()).isdisjoint(b.owned())
        await publish_keyed(redis, 0, 20)
        await eventually(lambda: all_seen(redis, 20), 30, message="all handled")
        ok, dupes = await order_report(redis, 20)
        assert ok and dupes == 0
        assert await nothing_pending(redis)
    finally:
        await a.stop(5)
        await b.stop(5)
    assert (
        await redis.mget([KEYS.shard_lease(GROUP, BASE, i) for i in range(SHARDS)])
        == [None] * SHARDS
    )
    assert await redis.zcard(members_key(KEYS, GROUP)) == 0


@pytest.mark.timeout(90)
async def test_order_holds_across_scale_up_and_down(redis: Any) -> None:
    """Shards move when consumers join and leave (graceful stop) while entries flow;
    pending entries move with their shard and per-key order holds without repeats."""

    async def slow_record(env: Envelope, redis: Any) -> None:
        await record(env, redis)
        await anyio.sleep(0.002)

    subs = [await start_sub(redis, "c0", slow_record)]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_keyed, redis, 0, 40)
            await eventually(lambda: redis.llen("seen:acct-0"), 10)
            subs.append(await start_sub(redis, "c1", slow_record))
            subs.append(await start_sub(redis, "c2", slow_record))
            await eventually(lambda: all(s.owned() for s in subs), 10, message="all own")
            await subs.pop(0).stop(5)  # scale down: c0 leaves
            await eventually(lambda: sum(len(s.owned()) for s in subs) == SHARDS, 10)
        await eventually(lambda: all_seen(redis, 40), 60, message="all handled")
        ok, dupes = await order_report(redis, 40)
        assert ok, "per-key order broken"
        assert dupes == 0
        assert await eventually(lambda: nothing_pending(redis), 10)
    finally:
        for sub in subs:
            await sub.stop(5)


@pytest.mark.timeout(60)
async def test_failing_entry_dead_lettered_after_max_deliveries_then_shard_moves_on(
    redis: Any,
) -> None:
    """An entry whose handler always fails blocks only its shard, is attempted exactly
    max_deliveries times, then dead-lettered (fenced, atomic with the ack); later
    entries of the key follow."""
    attempts: dict[int, int] = {}

    async def picky(env: Envelope, redis: Any) -> None:
        seq = env.meta["seq"]
        if env.meta["key"] == "acct-0" and seq == 1:
            attempts[seq] = attempts.get(seq, 0) + 1
            raise RuntimeError("boom")
        await record(env, redis)

    sub = await start_sub(redis, "solo", picky, max_deliveries=3, retry_backoff=0.01)
    try:
        await publish_keyed(redis, 0, 3)
        await eventually(lambda: redis.llen("seen:acct-0"), 10)
        await eventually(lambda: sub.stats.dead_lettered == 1, 15, message="dead-lettered")
        await eventually(lambda: llen_at_least(redis, "seen:acct-0", 2), 10)
        assert [int(v) for v in await redis.lrange("seen:acct-0", 0, -1)] == [0, 2]
        assert attempts == {1: 3}
        letters = await redis.xrange(KEYS.dead_letter(GROUP))
        assert len(letters) == 1
        assert await eventually(lambda: nothing_pending(redis), 10)
    finally:
        await sub.stop(5)


async def test_deleted_shard_stream_is_recreated(redis: Any) -> None:
    """A shard stream deleted under a running ordered consumer (DEL, group gone) is
    recreated with its group; entries published afterwards are handled."""
    sub = await start_sub(redis, "solo")
    try:
        await eventually(lambda: len(sub.owned()) == SHARDS, 10)
        await publish_keyed(redis, 0, 1)
        await eventually(lambda: all_seen(redis, 1), 10)
        for stream in KEYS.shard_streams(BASE, SHARDS):
            await redis.delete(stream)
        await publish_keyed(redis, 1, 3)
        await eventually(lambda: all_seen(redis, 3), 15, message="handled after DEL")
        ok, dupes = await order_report(redis, 3)
        assert ok and dupes == 0
    finally:
        await sub.stop(5)


class Procs:
    def __init__(self, python: str, script: Path, url: str) -> None:
        self.python, self.script, self.url = python, script, url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, consumer: str, ttl: float = 1.0) -> None:
        args = [self.url, BASE, str(SHARDS), GROUP, consumer, str(ttl)]
        self.procs[consumer] = subprocess.Popen(
            [self.python, str(self.script), *args], stdin=subprocess.DEVNULL
        )

    def kill(self, consumer: str) -> None:
        proc = self.procs[consumer]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def procs(python_exe: str, tmp_path: Path, redis_url: str) -> Iterator[Procs]:
    script = tmp_path / "ordered_worker.py"
    script.write_text(WORKER)
    pool = Procs(python_exe, script, redis_url)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("evict", [False, True], ids=["lease-expiry", "evicted"])
async def test_order_holds_across_sigkill_of_owner(redis: Any, procs: Procs, evict: bool) -> None:
    """SIGKILL of a worker process owning shards mid-stream: the survivor takes its
    shards (after the lease TTL, or at once when the supervisor evicts it), finishes
    its pending entries first, and per-key order holds (adjacent repeats of the
    entry in flight at the kill are the only duplicates)."""
    procs.start("w1")
    procs.start("w2")
    await eventually(lambda: llen_at_least(redis, "ready", 2), 20, message="workers ready")
    lease_of = [KEYS.shard_lease(GROUP, BASE, i) for i in range(SHARDS)]

    async def both_own() -> bool:
        owners = {text(v) for v in await redis.mget(lease_of) if v is not None}
        return owners == {"w1", "w2"}

    await eventually(both_own, 10, message="shards split")
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_keyed, redis, 0, 60)
        await eventually(lambda: redis.llen("seen:acct-3"), 10)
        await eventually(lambda: llen_at_least(redis, "seen:acct-3", 10), 20)
        procs.kill("w1")
        if evict:
            await evict_consumer(redis, KEYS, GROUP, [BASE], SHARDS, "w1")
    await eventually(lambda: all_seen(redis, 60), 60, message="all handled")
    ok, dupes = await order_report(redis, 60)
    assert ok, "per-key order broken"
    assert dupes <= SHARDS  # at most the in-flight entry of each shard w1 owned
    assert await eventually(lambda: nothing_pending(redis), 15)
    owners = {text(v) for v in await redis.mget(lease_of)}
    assert owners == {"w2"}


@pytest.mark.timeout(60)
async def test_supervisor_reclaim_evicts_dead_owner_and_hands_over(redis: Any) -> None:
    """Rebalancer.reclaim_dead on an ordered target does not XCLAIM to arbitrary
    siblings: it releases the dead worker's leases and membership, the shard's next
    owner finishes the dead one's pending entries before new ones (order holds,
    long before the lease TTL), and a later sweep deletes the emptied consumer."""
    from supervisor.delivery.consumers import consumers_of
    from supervisor.delivery.rebalance import GroupTarget, Rebalancer

    streams = KEYS.shard_streams(BASE, SHARDS)
    for stream in streams:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await redis.set(KEYS.shard_lease(GROUP, BASE, streams.index(stream)), "dead", px=60_000)
    await publish_keyed(redis, 0, 6)
    for stream in streams:
        await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=5)
    held = int((await redis.xpending(streams[0], GROUP))["pending"])
    assert held == 5

    live = await start_sub(redis, "live", lease_ttl=30.0)
    try:
        assert live.owned() == []
        reb = Rebalancer(redis, KEYS, "sup")
        target = GroupTarget(
            agent="ledger",
            group=GROUP,
            streams=tuple(streams),
            max_deliveries=5,
            claim_idle=60.0,
            dlq_stream=KEYS.dead_letter(GROUP),
            ordered=True,
            base_streams=(BASE,),
            shards=SHARDS,
        )
        moved = await reb.reclaim_dead(target, "dead", ["live"])
        assert moved == {"live": 5 * SHARDS}
        live.check_pending()
        await eventually(lambda: all_seen(redis, 6), 15, message="all handled")
        ok, dupes = await order_report(redis, 6)
        assert ok and dupes == 0
        assert await eventually(lambda: nothing_pending(redis), 10)
        assert await reb.sweep(target, ["live"]) == {}
        for stream in streams:
            assert "dead" not in {c.name for c in await consumers_of(redis, stream, GROUP)}
        assert reb.counters_for("ledger").deleted_consumers == 1
    finally:
        await live.stop(5)


FLEET_HANDLER = """
import asyncio


async def handle(env, redis):
    await redis.rpush("seen:" + env.meta["key"], env.meta["seq"])
    await asyncio.sleep(0.005)
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_ordered_agent_under_ag1_fleet_run_keeps_order_across_sigkill(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    """An `ordered = true` agent run by `ag1-fleet run` (2 workers, 4 shards): one worker
    is SIGKILLed mid-stream and replaced; every entry is handled, per-key order holds
    (adjacent repeats only) and nothing stays pending."""
    (tmp_path / "ordered_agent.py").write_text(FLEET_HANDLER)
    toml = f"""
[supervisor]
name = "ord"
[redis]
url = "{redis_url}"
[http]
enabled = false
[[agents]]
name = "ledger"
handler = "ordered_agent:handle"
replicas = 2
group = "{GROUP}"
streams = ["{BASE}"]
shards = {SHARDS}
ordered = true
backoff_initial = "50ms"
"""
    fleet = FleetProcess(tmp_path, toml, graceful=True)
    try:
        await eventually(
            lambda: fleet.find("fleet ready"), 60, interval=0.05, message="fleet ready"
        )
        leases = [KEYS.shard_lease(GROUP, BASE, i) for i in range(SHARDS)]

        async def split() -> bool:
            owners = {text(v) for v in await redis.mget(leases) if v is not None}
            return len(owners) == 2

        await eventually(split, 30, message="two owners")
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_keyed, redis, 0, 40)
            await eventually(lambda: llen_at_least(redis, "seen:acct-5", 10), 20)
            victim = psutil.Process(fleet.proc.pid).children()[0]
            victim.kill()
        await eventually(lambda: all_seen(redis, 40), 60, interval=0.1, message="all handled")
        ok, dupes = await order_report(redis, 40)
        assert ok, "per-key order broken"
        assert dupes <= SHARDS
        assert await eventually(lambda: nothing_pending(redis), 30)
    finally:
        fleet.close()


@pytest.mark.timeout(60)
async def test_owner_with_a_late_ownership_round_handles_nothing_past_its_lease(
    redis: Any,
) -> None:
    """An owner whose renewals stop (stalled loop, slow Redis) must not start handlers
    once its lease may have lapsed in Redis: the next owner takes the shards after the
    TTL and is the only one to handle what was published meanwhile (no split brain)."""
    handled: dict[str, list[int]] = {"late": [], "next": []}

    def recorder(name: str) -> Any:
        async def handle(env: Envelope, redis: Any) -> None:
            handled[name].append(int(env.meta["seq"]))
            await redis.rpush("seen:" + env.meta["key"], env.meta["seq"])

        return handle

    # tick=30: after its first round the "late" owner never renews in time
    late = await start_sub(redis, "late", handler=recorder("late"), lease_ttl=1.0, tick=30.0)
    try:
        assert len(late.owned()) == SHARDS
        lease_of = [KEYS.shard_lease(GROUP, BASE, i) for i in range(SHARDS)]

        async def lapsed() -> bool:
            return all(v is None for v in await redis.mget(lease_of))

        await eventually(lapsed, 5, message="late's leases expired in Redis")
        await publish_keyed(redis, 0, 5)
        nxt = await start_sub(redis, "next", handler=recorder("next"), lease_ttl=1.0)
        try:
            await eventually(lambda: all_seen(redis, 5), 30, message="all handled")
            ok, dupes = await order_report(redis, 5)
            assert ok and dupes == 0
            assert handled["late"] == []
            assert len(handled["next"]) == 5 * len(KEY_NAMES)
        finally:
            await nxt.stop(5)
    finally:
        await late.stop(5)
