"""The bus on a real 3-master Redis Cluster: one cluster per module, flushed per test.

Publish, subscribe over streams of several slots (one XREADGROUP per slot), retries,
dead letters of a tagged stream (one MULTI) and of an untagged one (the split path,
deduplicated), ordered shards spread across slots, RPC, discovery, and ``ag1-bus``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from core_bus import Envelope, publish_many, subscribe
from core_bus.keys import StreamKeyBuilder, dead_letter_seen
from core_bus.ordered import evict_consumer, subscribe_ordered
from core_bus.publish import publish_envelope
from core_bus.streams.deadletter import DeadLetter
from core_bus.streams.dlqwrite import write_dead_letters
from core_bus.streams.replies import entries_of, text
from core_bus.streams.slots import slot_of
from tests.cluster_harness import RedisClusterHarness
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KC = StreamKeyBuilder(cluster=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterHarness]:
    harness = RedisClusterHarness().start()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
async def rc(cluster: RedisClusterHarness) -> AsyncIterator[Any]:
    client = RedisCluster.from_url(cluster.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


async def _dlq(rc: Any, stream: str) -> list[DeadLetter]:
    return [DeadLetter.from_fields(i, f) for i, f in entries_of(await rc.xrange(stream)) if f]


async def test_delivery_tagged_and_untagged_streams_with_retries_and_dead_letters(
    rc: Any,
) -> None:
    """One subscription reads a tagged inbox and an untagged stream (two slots): every
    entry is handled, failures are retried, and those failing every attempt end in the
    group's dead-letter stream exactly once each (atomic for the inbox, split path for
    the untagged stream); nothing stays pending."""
    inbox, other = KC.agent_inbox("echo"), "orders"
    assert slot_of(inbox) == slot_of(KC.dead_letter("echo")) != slot_of(other)
    attempts: dict[str, int] = {}

    async def handler(env: Envelope) -> None:
        attempts[env.content] = attempts.get(env.content, 0) + 1
        number = int(env.content.rsplit("|", 1)[1])
        if number % 10 == 0:
            raise RuntimeError("always fails")
        if number % 10 == 1 and attempts[env.content] == 1:
            raise RuntimeError("fails once")

    for stream in (inbox, other):
        await publish_many(
            rc, stream, [Envelope(role="user", content=f"{stream}|{i}") for i in range(40)]
        )
    sub = await subscribe(
        rc,
        [inbox, other],
        handler,
        group="echo",
        count=20,
        max_deliveries=2,
        retry_backoff=0.01,
        retry_backoff_max=0.05,
    )
    try:
        await eventually(lambda: sub.stats.dead_lettered == 8, 20, message="8 dead letters")
        await eventually(lambda: sub.stats.processed == 72, 10, message="72 processed")
    finally:
        await sub.stop()
    letters = await _dlq(rc, KC.dead_letter("echo"))
    got = sorted(
        (d.source_stream, int(json.loads(d.data or b"{}")["content"].rsplit("|", 1)[1]))
        for d in letters
    )
    assert got == sorted((s, i) for s in (inbox, other) for i in range(0, 40, 10))
    for stream in (inbox, other):
        assert int((await rc.xpending(stream, "echo"))["pending"]) == 0
    assert await rc.exists(dead_letter_seen(KC.dead_letter("echo"))) == 1  # split path used


async def test_split_dead_letter_is_idempotent_by_source_stream_and_id(rc: Any) -> None:
    """A dead-letter write repeated after a crash between XADD and XACK (same source stream
    and id) adds no second dead letter and still acks."""
    dlq = KC.dead_letter("billing")
    await rc.xgroup_create("payments", "billing", id="0", mkstream=True)
    entry_id = text(await rc.xadd("payments", {"data": b"{}"}))
    await rc.xreadgroup("billing", "c", {"payments": ">"})
    record = {"reason": "max_deliveries", "source_stream": "payments", "source_id": entry_id}
    for _ in range(2):
        await write_dead_letters(rc, dlq, "billing", [("payments", entry_id, record)], None)
    assert await rc.xlen(dlq) == 1
    assert int((await rc.xpending("payments", "billing"))["pending"]) == 0


async def test_ordered_shards_spread_across_slots_keep_key_order(rc: Any) -> None:
    """Six shards of one inbox land on more than one master; each shard's lease shares its
    shard's slot (the fenced ack is one script), per-key order holds, a poison entry is
    dead-lettered (split path: the shard is not in the DLQ's slot) and evicting the owner
    releases its leases on every slot."""
    base, shards, group = KC.agent_inbox("ledger"), 6, "ledger"
    streams = KC.shard_streams(base, shards)
    assert len({slot_of(s) for s in streams}) == shards
    assert all(slot_of(KC.shard_lease(group, base, i)) == slot_of(streams[i]) for i in range(6))
    assert [int(await rc.cluster_keyslot(s)) for s in streams] == [slot_of(s) for s in streams]
    masters = {rc.nodes_manager.get_node_from_slot(slot_of(s)).name for s in streams}
    assert len(masters) > 1, "the six shards should not all land on one master"

    async def record(env: Envelope, redis: Any) -> None:
        await redis.rpush(f"seen:{{{env.meta['key']}}}", env.meta["seq"])
        if env.meta["key"] == "k0" and env.meta["seq"] == 3:
            raise RuntimeError("poison")

    keys = [f"k{i}" for i in range(8)]
    for seq in range(10):
        for key in keys:
            env = Envelope(role="user", meta={"key": key, "seq": seq})
            await publish_envelope(rc, KC.route(base, key, shards), env)
    sub = await subscribe_ordered(
        rc,
        [base],
        shards,
        record,
        group,
        "solo",
        lease_ttl=2.0,
        max_deliveries=2,
        retry_backoff=0.01,
        retry_backoff_max=0.02,
    )
    try:
        await sub.started()

        async def done() -> bool:
            return all([await rc.llen(f"seen:{{{k}}}") >= 10 for k in keys[1:]]) and (
                await rc.xlen(KC.dead_letter(group)) == 1
            )

        await eventually(done, 30, message="every key handled, one dead letter")
        await eventually(lambda: len(sub.owned()) == shards, 10, message="owns all 6 shards")
        # the supervisor's eviction of a dead owner: leases over 6 slots, one script each
        assert await evict_consumer(rc, KC, group, [base], shards, "solo") == shards
    finally:
        await sub.stop(5)
    assert await rc.zcard(KC.ordered_members(group)) == 0
    for key in keys[1:]:
        assert [int(v) for v in await rc.lrange(f"seen:{{{key}}}", 0, -1)] == list(range(10))


async def test_rpc_and_discovery_on_cluster(rc: Any, cluster: RedisClusterHarness) -> None:
    """An RPC call gets its reply through a private reply stream; a pattern subscription
    finds streams on every master (SCAN over all primaries) and later ones by notice."""
    from core_bus.discovery import start_bus_subscriptions
    from core_bus.rpc import bus_rpc_call, rpc_reply

    async def double(env: Envelope, redis: Any) -> None:
        await rpc_reply(redis, env, Envelope(role="agent", content=env.content * 2))

    service = KC.agent_inbox("doubler")
    sub = await subscribe(rc, service, double, group="doubler")
    try:
        reply = await bus_rpc_call(rc, service, Envelope(role="user", content=21), timeout=10)
        assert reply.content == 42
    finally:
        await sub.stop()

    names = [f"AG1:found:{i}" for i in range(6)]
    assert len({slot_of(n) for n in names}) > 1
    for name in names[:3]:  # no discovery notice: only SCAN over every master finds them
        await rc.xadd(name, {"data": Envelope(role="user", content=name).to_json()})
    seen: list[str] = []

    async def collect(env: Envelope) -> None:
        seen.append(str(env.content))

    handle = await start_bus_subscriptions(rc, ["AG1:found:*"], "finder", collect, poll_delay=0.2)
    try:
        await eventually(lambda: len(seen) == 3, 15, message="existing streams found")
        for name in names[3:]:
            await publish_envelope(rc, name, Envelope(role="user", content=name))
        await eventually(lambda: sorted(seen) == sorted(names), 15, message="new streams found")
    finally:
        await handle.stop()


def _bus(
    cluster: RedisClusterHarness, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env.update(REDIS_URL=cluster.url, REDIS_MODE="cluster")
    return subprocess.run(
        [sys.executable, "-m", "core_bus.tools.cli", "-q", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        cwd=Path(__file__).parent,
    )


async def test_ag1_bus_groups_dlq_and_tail_on_cluster(
    rc: Any, cluster: RedisClusterHarness
) -> None:
    """``ag1-bus groups`` lists groups of streams on every master, ``dlq`` lists and
    replays a group's dead letters (split path back to an untagged stream) and
    ``tail`` of a pattern prints the backlog of streams in four slots (one XREAD
    lane per slot), all with REDIS_MODE=cluster."""
    streams = [KC.agent_inbox(f"a{i}") for i in range(4)] + ["AG1:plain"]
    for stream in streams:
        await rc.xgroup_create(stream, "g", id="0", mkstream=True)
        await publish_envelope(rc, stream, Envelope(role="user", content=stream))
    out = _bus(cluster, "groups", "--json")
    assert out.returncode == 0, out.stderr
    listed = {g["stream"] for g in json.loads(out.stdout)["groups"]}
    assert listed == set(streams)

    entry_id = text((await rc.xreadgroup("g", "c", {"AG1:plain": ">"}))[0][1][0][0])
    record = {
        "data": Envelope(role="user", content="again").to_json(),
        "reason": "max_deliveries",
        "source_stream": "AG1:plain",
        "source_id": entry_id,
        "group": "g",
    }
    await write_dead_letters(rc, KC.dead_letter("g"), "g", [("AG1:plain", entry_id, record)], None)
    listing = _bus(cluster, "dlq", "list", "g")
    assert listing.returncode == 0 and "AG1:plain" in listing.stdout, listing.stderr
    replay = _bus(cluster, "dlq", "replay", "g", "--all", "--redis-url", cluster.url)
    assert replay.returncode == 0, replay.stderr + replay.stdout
    assert await rc.xlen(KC.dead_letter("g")) == 0 and await rc.xlen("AG1:plain") == 2

    tail = _bus(cluster, "tail", "AG1:agent:*:inbox", "--from-start", "--count", "4")
    assert tail.returncode == 0, tail.stderr
    assert all(stream in tail.stdout for stream in streams[:4]), tail.stdout  # 4 slots


HANGING_HANDLER = """
import os
from pathlib import Path

import anyio

HERE = Path(__file__).parent


async def handle(env, redis):
    flag = HERE / ("hang-" + os.environ["AG1_WORKER"].replace("/", "-"))
    while flag.exists():
        await anyio.sleep(0.05)
    await redis.sadd("reclaim:seen", env.envelope_id)
"""


@pytest.mark.timeout(90)
async def test_fleet_on_cluster_idle_sweep_then_crash_reclaim(
    rc: Any, cluster: RedisClusterHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real fleet with REDIS_MODE=cluster (supervisor and workers on the cluster, tagged
    keys): a hung worker's queued entries are swept to its sibling after claim_idle, then
    SIGKILLing it reclaims the entry it was running at once; every entry is handled once
    and nothing stays pending."""
    import signal

    from tests.fleet_harness import agent, agent_toml, fleet_toml, running, worker

    monkeypatch.setenv("REDIS_MODE", "cluster")
    inbox = KC.agent_inbox("hold")
    (tmp_path / "hold_agent.py").write_text(HANGING_HANDLER)
    (tmp_path / "hang-hold-0").write_text("")
    (tmp_path / "hang-hold-1").write_text("")
    toml = fleet_toml(
        agent_toml(
            "hold",
            handler="hold_agent:handle",
            stop_timeout="1s",
            replicas=2,
            concurrency=1,
            claim_idle="500ms",
            sweep_interval="200ms",
            max_deliveries=100,
        ),
        url=cluster.url,
    )

    async def pending_of(consumer: str) -> int:
        return len(await rc.xpending_range(inbox, "hold", "-", "+", 1000, consumername=consumer))

    async def group_pending_is(n: int) -> bool:
        return int((await rc.xpending(inbox, "hold"))["pending"]) == n

    async def seen_is(n: int) -> bool:
        return int(await rc.scard("reclaim:seen")) == n

    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "hold").ready_replicas == 2, timeout=30)
        hung = worker(daemon, "hold", 0)
        total = 0
        while total < 50 and await pending_of(hung.consumer or "") < 2:
            batch = [Envelope(role="user", content=total + i) for i in range(10)]
            await publish_many(rc, inbox, batch)
            total += 10
            await eventually(lambda n=total: group_pending_is(n), timeout=15)
        assert await pending_of(hung.consumer or "") >= 2, "the hung worker never queued one"
        (tmp_path / "hang-hold-1").unlink()
        await eventually(lambda: seen_is(total - 1), timeout=30, message="swept to the sibling")
        assert agent(daemon, "hold").reclaimed_by_reason.get("idle", 0) >= 1
        os.kill(hung.pid or 0, signal.SIGKILL)
        await eventually(lambda: seen_is(total), timeout=15, message="crash reclaim")
        await eventually(lambda: group_pending_is(0), timeout=15)
        assert agent(daemon, "hold").reclaimed_by_reason.get("crash", 0) >= 1


CHAOS_HANDLER = """
import asyncio


async def handle(env, redis):
    pipe = redis.pipeline(transaction=False)
    pipe.sadd("chaos:seen", env.envelope_id)
    pipe.incr("chaos:calls")
    await pipe.execute()
    await asyncio.sleep(0.001)
"""

CHAOS_FLEET = """
[supervisor]
name = "chaos"
sweep_interval = "1s"
stop_timeout = "5s"
[redis]
url = "{url}"
[http]
enabled = true
listen = "127.0.0.1:0"
[[agents]]
name = "chaos"
handler = "chaos_agent:handle"
replicas = 4
concurrency = 16
count = 20
max_deliveries = 10
claim_idle = "5s"
backoff_initial = "10ms"
backoff_max = "100ms"
start_limit = 10000
start_limit_window = "60s"
stop_timeout = "2s"
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_chaos_on_cluster_sigkills_lose_nothing(
    rc: Any, cluster: RedisClusterHarness, tmp_path: Path
) -> None:
    """``ag1-fleet run`` on the cluster, 4 workers, a random worker SIGKILLed every 300 ms
    for 4 s while 3,000 envelopes arrive: every envelope handled, nothing pending, no
    dead-letter, no dead consumer left in the group; duplicates printed."""
    import random
    import signal
    import time

    import aiohttp
    import anyio

    from supervisor.delivery.consumers import consumers_of
    from tests.fleet_harness import FleetProcess

    total, inbox = 3000, KC.agent_inbox("chaos")
    (tmp_path / "chaos_agent.py").write_text(CHAOS_HANDLER)
    fleet = FleetProcess(
        tmp_path, CHAOS_FLEET.format(url=cluster.url), env={"REDIS_MODE": "cluster"}
    )
    try:
        await eventually(lambda: fleet.events("fleet ready"), 30, message="fleet ready")
        port = int(fleet.events("http_listening")[-1]["port"])
        envelopes = [Envelope(role="user", content=i) for i in range(total)]
        kills, started, rng = 0, time.monotonic(), random.Random(16)

        async def publish_steadily() -> None:
            for start in range(0, total, 150):
                await publish_many(rc, inbox, envelopes[start : start + 150], maxlen=0)
                await anyio.sleep(0.15)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_steadily)
            while time.monotonic() - started < 4.0:
                await anyio.sleep(0.3)
                pids = sorted(fleet.worker_pids())
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1

        async def all_seen() -> bool:
            return int(await rc.scard("chaos:seen")) == total

        await eventually(all_seen, 45, interval=0.2, message="every envelope handled")

        async def live() -> set[str]:
            url = f"http://127.0.0.1:{port}/status"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                snap = await resp.json()
            return {
                w["consumer"]
                for w in snap["agents"][0]["workers"]
                if w["state"] == "ready" and w["consumer"]
            }

        async def settled() -> bool:
            pending = int((await rc.xpending(inbox, "chaos"))["pending"])
            names = {c.name for c in await consumers_of(rc, inbox, "chaos")}
            alive = await live()
            return pending == 0 and len(alive) == 4 and names == alive

        await eventually(settled, 30, interval=0.2, message="nothing pending, no dead consumer")
        assert await rc.xlen(KC.dead_letter("chaos")) == 0
        calls = int(await rc.get("chaos:calls"))
        print(f"cluster chaos: {total} envelopes, {kills} kills, {calls - total} duplicates")
        assert kills >= 8
    finally:
        fleet.close()
