"""Rebalancer: crash-aware reclaim, idle sweep, consumer cleanup and poison.

Real redis-server (session fixture, plus a Redis 6.2 server where the reply
shapes differ) and real worker processes that are SIGKILLed while they hold
pending entries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as redis_asyncio

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.deadletter import DeadLetter
from core_bus.streams.replies import fields_of, streams_of, text
from supervisor.delivery.consumers import (
    DELETE_DONE,
    DELETE_HAS_PENDING,
    ConsumerDeleter,
    consumers_of,
    pending_entries,
)
from supervisor.delivery.rebalance import GroupTarget, Rebalancer
from supervisor.redis.server import bundled_redis_server, redis_server_version
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

KEYS = StreamKeyBuilder()
STREAM = KEYS.agent_inbox("echo")
GROUP = "echo"

# A worker that takes entries into its pending list, records each attempt
# (HINCRBY attempts <id>) and then hangs until it is killed. mode "read" reads
# new entries (XREADGROUP >); mode "pending" handles what was claimed to it the
# way a receiver's check_pending does (XPENDING + XRANGE: no extra delivery).
WORKER = """
import sys, time, redis
url, stream, group, consumer, mode, count = sys.argv[1:7]
r = redis.Redis.from_url(url)
if mode == "read":
    reply = r.xreadgroup(group, consumer, {stream: ">"}, count=int(count))
    ids = [e[0] for _s, entries in (reply.items() if isinstance(reply, dict) else reply)
           for e in (entries[0] if entries and isinstance(entries[0], list) else entries)]
else:
    rows = r.xpending_range(stream, group, "-", "+", int(count), consumername=consumer)
    ids = [row["message_id"] for row in rows
           if r.xrange(stream, row["message_id"], row["message_id"])]
for entry_id in ids:
    r.hincrby("attempts", entry_id, 1)
r.rpush("ready:" + consumer, len(ids))
while True:
    time.sleep(3600)
"""


def target(**overrides: Any) -> GroupTarget:
    values: dict[str, Any] = {
        "agent": "echo",
        "group": GROUP,
        "streams": (STREAM,),
        "max_deliveries": 5,
        "claim_idle": 0.3,
        "dlq_stream": KEYS.dead_letter(GROUP),
    }
    values.update(overrides)
    return GroupTarget(**values)


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    path = tmp_path / "hang_worker.py"
    path.write_text(WORKER)
    return path


class Workers:
    """Worker subprocesses started by one test; every one is killed at the end."""

    def __init__(self, python: str, script: Path, url: str) -> None:
        self.python, self.script, self.url = python, script, url
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(
        self, redis: Any, consumer: str, mode: str = "read", count: int = 100
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [self.python, str(self.script), self.url, STREAM, GROUP, consumer, mode, str(count)],
            stdin=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        await eventually(lambda: redis.exists(f"ready:{consumer}"), 15, message="worker ready")
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def workers(python_exe: str, worker_script: Path, redis_url: str) -> Iterator[Workers]:
    pool = Workers(python_exe, worker_script, redis_url)
    try:
        yield pool
    finally:
        pool.close()


async def setup_group(redis: Any, n: int, stream: str = STREAM) -> list[str]:
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    pipe = redis.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"data": f'{{"role":"user","content":{i}}}'})
    return [text(i) for i in await pipe.execute()]


async def read_as(redis: Any, consumer: str, count: int, stream: str = STREAM) -> list[str]:
    """XREADGROUP without ack: the entries become ``consumer``'s pending entries."""
    reply = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [entry_id for _s, entries in streams_of(reply) for entry_id, _f in entries]


async def process_pending(redis: Any, consumer: str, stream: str = STREAM) -> list[str]:
    """What a receiver's check_pending does: handle own pending entries (XRANGE) and ack."""
    done: list[str] = []
    while True:
        rows = await pending_entries(redis, stream, GROUP, consumer=consumer, count=500)
        if not rows:
            return done
        ids = [row.id for row in rows]
        await redis.sadd("processed", *ids)
        await redis.xack(stream, GROUP, *ids)
        done.extend(ids)


async def consumer_names(redis: Any, stream: str = STREAM) -> set[str]:
    return {c.name for c in await consumers_of(redis, stream, GROUP)}


async def pending_count(redis: Any, stream: str = STREAM) -> int:
    summary = await redis.xpending(stream, GROUP)
    return int(summary["pending"])


@pytest.mark.timeout(60)
async def test_sigkilled_worker_entries_go_to_live_consumers(redis: Any, workers: Workers) -> None:
    """SIGKILL of a worker holding pending entries: reclaim_dead spreads them over the
    live consumers, each is processed once, nothing stays pending, the dead consumer
    is deleted and the counters say so."""
    ids = await setup_group(redis, 30)
    dead = "host:echo:0:1111"
    proc = await workers.start(redis, dead, count=20)
    assert await pending_count(redis) == 20
    workers.kill(proc)

    reb = Rebalancer(redis, KEYS, "sup")
    moved = await reb.reclaim_dead(target(), dead, ["host:echo:1:2222", "host:echo:2:3333"])

    assert moved == {"host:echo:1:2222": 10, "host:echo:2:3333": 10}
    done = await process_pending(redis, "host:echo:1:2222")
    done += await process_pending(redis, "host:echo:2:3333")
    assert sorted(done) == sorted(ids[:20])
    assert await pending_count(redis) == 0
    assert dead not in await consumer_names(redis)
    counters = reb.counters_for("echo")
    assert counters.reclaimed_by_reason["crash"] == 20
    assert counters.deleted_consumers == 1
    assert counters.dead_lettered == 0


async def test_no_live_consumer_leaves_entries_pending(redis: Any) -> None:
    """With no live consumer nothing is claimed and the dead consumer, which still owns
    entries, is not deleted (DELCONSUMER would destroy them)."""
    await setup_group(redis, 5)
    await read_as(redis, "dead", 5)
    reb = Rebalancer(redis, KEYS, "sup")
    assert await reb.reclaim_dead(target(), "dead", []) == {}
    assert await pending_count(redis) == 5
    assert "dead" in await consumer_names(redis)
    # the replacement worker comes up later and gets them
    assert await reb.reclaim_dead(target(), "dead", ["replacement"]) == {"replacement": 5}
    assert "dead" not in await consumer_names(redis)


async def test_hundred_restarts_do_not_accumulate_consumers(redis: Any) -> None:
    """100 worker incarnations each die holding an entry: every entry is processed,
    and the group ends with only the live consumer."""
    ids = await setup_group(redis, 100)
    reb = Rebalancer(redis, KEYS, "sup")
    for n in range(100):
        dead = f"host:echo:0:{10_000 + n}"
        assert len(await read_as(redis, dead, 1)) == 1
        assert await reb.reclaim_dead(target(), dead, ["live"]) == {"live": 1}
        await process_pending(redis, "live")
    assert await consumer_names(redis) == {"live"}
    assert await redis.scard("processed") == len(ids)
    assert reb.counters_for("echo").deleted_consumers == 100


@pytest.mark.timeout(60)
async def test_sweep_moves_hung_handler_entries_after_claim_idle(
    redis: Any, workers: Workers
) -> None:
    """A live but hung worker keeps its entries until they are idle for claim_idle; then
    the sweep hands them to other consumers, who process them."""
    ids = await setup_group(redis, 6)
    await workers.start(redis, "hung", count=6)
    reb = Rebalancer(redis, KEYS, "sup")
    tgt = target(claim_idle=0.5)
    first = await reb.sweep(tgt, ["a", "b"])
    rows = await pending_entries(redis, STREAM, GROUP, count=10)
    if first == {}:  # the normal case: not idle long enough yet
        assert {r.consumer for r in rows} == {"hung"}

    async def swept() -> bool:
        await reb.sweep(tgt, ["a", "b"])
        rows = await pending_entries(redis, STREAM, GROUP, consumer="hung", count=10)
        return not rows

    await eventually(swept, 10, interval=0.1, message="sweep moved the hung entries")
    done = await process_pending(redis, "a") + await process_pending(redis, "b")
    assert sorted(done) == sorted(ids)
    assert await pending_count(redis) == 0
    assert reb.counters_for("echo").reclaimed_by_reason["idle"] == 6


@pytest.mark.timeout(60)
async def test_poison_dead_lettered_after_exactly_max_deliveries(
    redis: Any, workers: Workers
) -> None:
    """An entry that kills every worker handling it is attempted exactly max_deliveries
    times across restarts and reclaims, then dead-lettered with its reason and acked."""
    (entry_id,) = await setup_group(redis, 1)
    tgt = target(max_deliveries=3)
    reb = Rebalancer(redis, KEYS, "sup")
    proc = await workers.start(redis, "w0", mode="read")
    for n in range(1, 4):
        workers.kill(proc)
        moved = await reb.reclaim_dead(tgt, f"w{n - 1}", [f"w{n}"])
        if n < 3:
            assert moved == {f"w{n}": 1}
            proc = await workers.start(redis, f"w{n}", mode="pending")
        else:
            assert moved == {}
    assert int(await redis.hget("attempts", entry_id)) == 3
    assert await pending_count(redis) == 0
    letters = await redis.xrange(tgt.dlq_stream)
    assert len(letters) == 1
    letter = DeadLetter.from_fields(text(letters[0][0]), fields_of(letters[0][1]) or {})
    assert letter.reason == "max_deliveries"
    assert letter.source_id == entry_id
    assert letter.deliveries == 3
    assert letter.data == b'{"role":"user","content":0}'
    assert reb.counters_for("echo").dead_lettered == 1
    assert await consumer_names(redis) == set()


async def test_sweep_dead_letters_poison_it_claims(redis: Any) -> None:
    """An idle entry whose delivery count passes max_deliveries when the sweep claims it
    is dead-lettered and acked in the same step instead of handed out again."""
    (entry_id,) = await setup_group(redis, 1)
    tgt = target(max_deliveries=2, claim_idle=0)
    await read_as(redis, "w0", 1)  # delivery 1
    reb = Rebalancer(redis, KEYS, "sup")
    assert await reb.sweep(tgt, ["w1"]) == {"w1": 1}  # delivery 2: still allowed
    assert await reb.sweep(tgt, ["w2"]) == {}  # delivery 3 > 2: poison
    assert await pending_count(redis) == 0
    letters = await redis.xrange(tgt.dlq_stream)
    assert len(letters) == 1
    assert text(fields_of(letters[0][1])["source_id"]) == entry_id  # type: ignore[index]


async def test_sweep_survives_trimmed_pending_entries(redis: Any) -> None:
    """Pending entries trimmed or XDELed after delivery neither loop nor crash the sweep
    (Redis 7 reports them separately); they leave the pending list and are counted."""
    ids = await setup_group(redis, 1000)
    await read_as(redis, "gone", 1000)
    await redis.xtrim(STREAM, maxlen=300)  # exact trim: 700 pending ids lose their entries
    await redis.xdel(STREAM, ids[900])
    reb = Rebalancer(redis, KEYS, "sup")
    with anyio.fail_after(10):
        moved = await reb.sweep(target(claim_idle=0), ["live"])
    assert moved == {"live": 299}
    assert reb.counters_for("echo").deleted_entries == 701
    assert await pending_count(redis) == 299
    with anyio.fail_after(10):
        # a second pass finds every idle entry already with the only live consumer:
        # nothing moves (no pointless redelivery) and nothing loops
        assert await reb.sweep(target(claim_idle=0), ["live"]) == {}
    assert await pending_count(redis) == 299


async def test_reclaim_acks_trimmed_entries_and_deletes_consumer(redis: Any) -> None:
    """reclaim_dead of a consumer whose pending entries were partly trimmed away claims
    the rest, drops the vanished ids and still deletes the consumer."""
    ids = await setup_group(redis, 500)
    await read_as(redis, "dead", 500)
    await redis.xdel(STREAM, *ids[:250:2])
    reb = Rebalancer(redis, KEYS, "sup")
    moved = await reb.reclaim_dead(target(), "dead", ["live"])
    assert moved == {"live": 375}
    assert await pending_count(redis) == 375
    assert "dead" not in await consumer_names(redis)
    assert reb.counters_for("echo").deleted_entries == 125


async def test_cleanup_stale_reclaims_previous_run_consumers(redis: Any) -> None:
    """At start, consumers this supervisor recorded in its registry (a previous run's,
    not live) are reclaimed, deleted and forgotten; other supervisors' consumers and
    library users' consumers on the same host are left alone, whatever their names."""
    await setup_group(redis, 12)
    await read_as(redis, "hostA/echo/0/100", 3)
    await read_as(redis, "hostA/echo/1/101", 3)
    await read_as(redis, "hostB/echo/0/200", 3)
    await read_as(redis, "hostA:4242:abcdef", 3)  # a library user on host A (default name)
    await redis.xgroup_createconsumer(STREAM, GROUP, "hostA/echo/0/300")
    reb = Rebalancer(redis, KEYS, "hostA")
    for name in ("hostA/echo/0/100", "hostA/echo/1/101", "hostA/echo/0/300"):
        await reb.registry.record(name, "echo")
    moved = await reb.cleanup_stale(target(), ["hostA/echo/0/300"])
    assert moved == {"hostA/echo/0/300": 6}
    assert await consumer_names(redis) == {
        "hostA/echo/0/300",
        "hostB/echo/0/200",
        "hostA:4242:abcdef",
    }
    assert await reb.registry.names("echo") == ["hostA/echo/0/300"]
    counters = reb.counters_for("echo")
    assert counters.reclaimed_by_reason["startup"] == 6
    assert counters.deleted_consumers == 2


async def test_delete_if_empty_is_atomic_with_a_zombie_reader(redis: Any, redis_url: str) -> None:
    """The check-then-delete race is closed: a 'dead' consumer that keeps reading
    (a zombie) while reclaim_dead runs again and again never loses an entry to
    DELCONSUMER — every published entry is processed."""
    ids = await setup_group(redis, 400)
    reb = Rebalancer(redis, KEYS, "sup")
    zombie = redis_asyncio.Redis.from_url(redis_url)
    stop = anyio.Event()

    async def zombie_reads() -> None:
        while not stop.is_set():
            if not await read_as(zombie, "zombie", 3):
                await anyio.sleep(0.001)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(zombie_reads)
            for _ in range(200):
                await reb.reclaim_dead(target(), "zombie", ["live"])
                await process_pending(redis, "live")
            stop.set()
        await reb.reclaim_dead(target(), "zombie", ["live"])
        await process_pending(redis, "live")
    finally:
        await zombie.aclose()
    assert await redis.scard("processed") == len(ids)
    assert await pending_count(redis) == 0


async def test_deleter_refuses_consumer_with_pending(redis: Any) -> None:
    """ConsumerDeleter deletes only consumers whose pending list is empty."""
    await setup_group(redis, 2)
    await read_as(redis, "busy", 1)
    await redis.xgroup_createconsumer(STREAM, GROUP, "idle")
    deleter = ConsumerDeleter(redis)
    assert await deleter.delete_if_empty(STREAM, GROUP, "busy") == DELETE_HAS_PENDING
    assert await deleter.delete_if_empty(STREAM, GROUP, "idle") == DELETE_DONE
    assert await consumer_names(redis) == {"busy"}


async def test_group_stats_counts_the_lag_redis_does_not_give(redis: Any) -> None:
    """group_stats gives pending, consumers and lag per stream; where Redis cannot
    compute the lag (NULL after an XDEL, or no field before 7.0) the entries after the
    group's last-delivered id are counted and ``lag_note`` says so; missing streams are
    skipped."""
    ids = await setup_group(redis, 10)
    await read_as(redis, "c", 4)
    other = KEYS.agent_inbox("other")
    for i in range(5):
        await redis.xadd(other, {"data": str(i)})
    await redis.xgroup_create(other, GROUP, id="0")
    await redis.xdel(other, text((await redis.xrange(other, count=2))[1][0]))
    reb = Rebalancer(redis, KEYS, "sup")
    stats = await reb.group_stats(target(streams=(STREAM, other, "AG1:missing")))
    assert [(s.stream, s.pending, s.lag, s.consumers) for s in stats] == [
        (STREAM, 4, 6, 1),
        (other, 0, 4, 0),  # 5 added, 1 deleted, none delivered
    ]
    version = (await redis.info("server"))["redis_version"]
    version = version.decode() if isinstance(version, bytes) else str(version)
    if int(version.split(".")[0]) >= 7:
        assert stats[0].lag_note is None  # Redis' own figure
    assert stats[1].lag_note is not None and "counted" in stats[1].lag_note
    assert ids


@pytest.mark.timeout(60)
async def test_redis_62_nil_entries_are_acked(redis_server_factory: Any) -> None:
    """Redis 6.2 returns deleted pending entries as id-less nils from XCLAIM and
    XAUTOCLAIM; reclaim and sweep ack them instead of looping or handing them out."""
    binary = bundled_redis_server()
    if binary is None or redis_server_version(binary)[:2] != (6, 2):
        pytest.skip("no Redis 6.2 binary bundled (the embedded server needs >= 7.0 now)")
    server = redis_server_factory(binary=binary, appendonly=False)
    client = redis_asyncio.Redis.from_url(server.url)
    try:
        ids = await setup_group(client, 300)
        await read_as(client, "dead", 150)
        await read_as(client, "hung", 150)
        await client.xdel(STREAM, *ids[::3])
        reb = Rebalancer(client, KEYS, "sup")
        assert await reb.reclaim_dead(target(), "dead", ["live"]) == {"live": 100}
        assert await reb.sweep(target(claim_idle=0), ["other"]) == {"other": 200}
        assert await pending_count(client) == 200
        assert "dead" not in await consumer_names(client)
        assert reb.counters_for("echo").deleted_entries == 100
    finally:
        await client.aclose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


async def test_bounded_sweep_resumes_from_its_cursor(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep stops after MAX_BATCHES batches per stream and the next sweep continues
    from the saved cursor instead of rescanning the head, so every idle entry is
    eventually covered without one call running unbounded."""
    import supervisor.delivery.rebalance as rebalance

    monkeypatch.setattr(rebalance, "MAX_BATCHES", 2)
    monkeypatch.setattr(rebalance, "BATCH", 100)
    ids = await setup_group(redis, 500)
    await read_as(redis, "gone", 500)
    reb = Rebalancer(redis, KEYS, "sup")
    tgt = target(claim_idle=0)
    claimed = [sum((await reb.sweep(tgt, ["live"])).values()) for _ in range(3)]
    assert claimed == [200, 200, 100]
    rows = await pending_entries(redis, STREAM, GROUP, consumer="live", count=1000)
    assert sorted(r.id for r in rows) == sorted(ids)
