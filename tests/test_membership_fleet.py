"""Fleets across hosts (issue 15): supervisors on one Redis notice a dead or cut-off peer.

Real `ag1-fleet run` processes, each in its own state dir, on the session's
private Redis, each test in its own namespace; ``lease_ttl = 1s`` so a death is
noticed within about a second. What is pinned:

- SIGKILL of one supervisor of three (its workers die with it, PDEATHSIG) under
  load: the others reclaim at once (within ~lease_ttl), every entry is
  processed, nothing stays pending, none of its consumers is left in the group;
  graceful stop of another: its lease goes at once, departed says ``left``,
  nothing is processed twice. An agent only the dead supervisor ran keeps its
  entries pending and the dead member stays listed with ``pending_left`` until it
  comes back (its join closes the dead record with a ``departed`` entry).
- SIGSTOP of a whole supervisor tree for longer than lease_ttl (a partition):
  its peer reclaims, the stopped host re-registers under a new incarnation
  after SIGCONT, entries reclaimed elsewhere are not run again (duplicates are
  only handlers that were running at the stop), ordered shards never ran on a
  consumer that did not hold the shard's lease.
- A reclaim lock whose holder died does not block: taken by hand with a short
  PX, another supervisor finishes after it expires.

On the code before (no membership) none of the member_* events, departed entries
or fast reclaims exist: every test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from core_bus import Envelope, publish_many
from core_bus.keys import StreamKeyBuilder
from supervisor.membership.directory import departed, members
from tests.fleet_harness import FleetProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(90)]

HANDLER = """
import os

import anyio

from core_bus.keys import StreamKeyBuilder

NS = os.environ.get("BUS_NAMESPACE", "AG1")
ME = os.environ.get("AG1_CONSUMER", "")
KEYS = StreamKeyBuilder(NS)


STARTS = os.path.join(os.environ.get("AG1_WORKING_DIR", "."), "starts.log")


async def work(env, redis):
    with open(STARTS, "a") as log:  # written before the first await: a start is a start
        log.write(str(env.content) + " ")
    await anyio.sleep(0.03)
    await redis.hincrby(NS + ":t:runs", str(env.content), 1)


async def slow(env, redis):
    await anyio.sleep(0.3)
    await redis.hincrby(NS + ":t:solo", str(env.content), 1)


async def ordered(env, redis):
    key, seq, shard = str(env.content).split(":")
    lease = KEYS.shard_lease("ord", KEYS.agent_inbox("ord"), int(shard))
    owner = await redis.get(lease)
    if (owner.decode() if owner else "") != ME:
        await redis.rpush(NS + ":t:violations", ME + " ran " + lease + " held by " + repr(owner))
    await redis.rpush(NS + ":t:ord:" + key, seq)
    await anyio.sleep(0.005)
"""


def fleet_toml(name: str, url: str, ns: str, *, ordered: bool = False, solo: bool = False) -> str:
    text = f"""
    [supervisor]
    name = "{name}"
    lease_ttl = "1s"
    stop_timeout = "5s"

    [redis]
    url = "{url}"
    namespace = "{ns}"

    [http]
    enabled = false

    [[agents]]
    name = "work"
    handler = "m15:work"
    replicas = 1
    concurrency = 4
    stop_timeout = "3s"
    claim_idle = "60s"
    """
    if solo:  # an agent only this supervisor runs
        text += """
    [[agents]]
    name = "solo"
    handler = "m15:slow"
    replicas = 1
    concurrency = 1
    stop_timeout = "3s"
    claim_idle = "60s"
    """
    if ordered:
        text += """
    [[agents]]
    name = "ord"
    handler = "m15:ordered"
    replicas = 1
    shards = 4
    ordered = true
    stop_timeout = "3s"
    """
    return text


def start(tmp_path: Path, name: str, url: str, ns: str, **kw: Any) -> FleetProcess:
    home = tmp_path / name
    home.mkdir()
    (home / "m15.py").write_text(HANDLER)
    return FleetProcess(home, fleet_toml(name, url, ns, **kw))


def tree(fleet: FleetProcess) -> list[int]:
    try:
        root = psutil.Process(fleet.proc.pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def signal_tree(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def runs(redis: Any, ns: str) -> Counter[str]:
    raw = await redis.hgetall(f"{ns}:t:runs")
    return Counter({k.decode(): int(v) for k, v in raw.items()})


async def pending(redis: Any, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def pending_of(redis: Any, stream: str, group: str, prefix: str) -> int:
    info = await redis.xpending(stream, group)
    return sum(
        int(c["pending"])
        for c in info.get("consumers") or ()
        if c["name"].decode().startswith(prefix)
    )


async def consumers(redis: Any, stream: str, group: str) -> list[str]:
    return [c["name"].decode() for c in await redis.xinfo_consumers(stream, group)]


async def load(redis: Any, stream: str, start: int, n: int) -> int:
    await publish_many(
        redis, stream, [Envelope(role="user", content=i) for i in range(start, start + n)]
    )
    return start + n


def ready(fleet: FleetProcess) -> None:
    fleet.wait_event("member_joined", timeout=30)
    fleet.wait_event("fleet ready", timeout=30)


async def test_three_supervisors_sigkill_one_then_stop_one(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """SIGKILL one of three under load: reclaimed within ~lease_ttl, nothing lost or left
    pending, no dead consumer left; its agent nobody else runs waits (pending_left) until
    it restarts; then a graceful stop of another: departed 'left', no entry processed
    twice, its lease gone at once."""
    ns = "M15K"
    keys = StreamKeyBuilder(ns)
    inbox = keys.agent_inbox("work")
    solo_inbox = keys.agent_inbox("solo")
    fleets = [start(tmp_path, "alpha", redis_url, ns, solo=True)]
    fleets += [start(tmp_path, n, redis_url, ns) for n in ("bravo", "charlie")]
    try:
        for f in fleets:
            ready(f)
        victim, quitter, last = fleets
        await eventually(lambda: _count_alive(redis, keys, 3), timeout=10)
        sent = 0
        await load(redis, solo_inbox, 0, 10)  # ~3 s of work for alpha's one slow worker
        # Keep the fleet busy until the victim holds entries, then kill its whole tree.
        while await pending_of(redis, inbox, "work", "alpha/") < 4 and sent < 3000:
            sent = await load(redis, inbox, sent, 40)
        await eventually(lambda: pending_of(redis, solo_inbox, "solo", "alpha/"), timeout=5)
        pids = tree(victim)
        killed_at = time.monotonic()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(5)
        sent = await load(redis, inbox, sent, 100)
        survivors_reclaim = await eventually(
            lambda: (
                quitter.find("member_reclaimed", member="alpha")
                + last.find("member_reclaimed", member="alpha")
            ),
            timeout=10,
            message="member_reclaimed",
        )
        noticed = time.monotonic() - killed_at
        assert noticed < 4.0, noticed  # lease_ttl 1 s, plus one check interval and slack
        assert sum(e["entries"] for e in survivors_reclaim) >= 1
        await eventually(lambda: _all_done(redis, ns, sent), timeout=20, message="all processed")
        await eventually(lambda: _pending_is(redis, inbox, "work", 0), timeout=10)
        assert not [c for c in await consumers(redis, inbox, "work") if c.startswith("alpha/")]
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        )
        killed_dupes = sum(v - 1 for v in (await runs(redis, ns)).values())
        assert killed_dupes <= 4 + 100, killed_dupes  # running or unacked on the victim

        # Nobody else runs "solo": its entries stay pending and status says so.
        dead = await eventually(
            lambda: _member_with_pending_left(redis, keys, "alpha", "solo"), timeout=10
        )
        assert not dead.alive and dead.reclaimed.get("work", 0) >= 1
        assert await pending_of(redis, solo_inbox, "solo", "alpha/") >= 1
        # alpha comes back: its join closes the dead record, its start-up cleanup takes "solo"
        victim = FleetProcess(tmp_path / "alpha", fleet_toml("alpha", redis_url, ns, solo=True))
        fleets.append(victim)
        ready(victim)
        await eventually(lambda: _hlen_is(redis, f"{ns}:t:solo", 10), timeout=20, message="solo")
        await eventually(lambda: _pending_is(redis, solo_inbox, "solo", 0), timeout=10)
        [closed] = [d for d in await departed(redis, keys) if d.name == "alpha"]
        assert closed.reason == "expired" and closed.pending_left.get("solo", 0) >= 1
        assert closed.reclaimed.get("work", 0) >= 1 and closed.reclaimed_by
        now = {m.name: m for m in await members(redis, keys)}
        assert now["alpha"].alive and now["alpha"].incarnation != closed.incarnation

        # Graceful stop of bravo under load: nothing processed twice, lease gone at once.
        before = await runs(redis, ns)
        sent = await load(redis, inbox, sent, 150)
        quitter.stop(timeout=20)
        assert await redis.exists(keys.fleet_lease("bravo")) == 0
        left = [d for d in await departed(redis, keys) if d.name == "bravo"]
        assert [d.reason for d in left][:1] == ["left"]
        await eventually(lambda: _all_done(redis, ns, sent), timeout=20, message="all processed")
        await eventually(lambda: _pending_is(redis, inbox, "work", 0), timeout=10)
        after = await runs(redis, ns)
        assert all(after[k] == before[k] for k in before)  # nothing old ran again
        assert [k for k in after if k not in before and after[k] > 1] == []
        assert quitter.find("member_left")
        assert "bravo" not in {m.name for m in await members(redis, keys) if m.alive}
    finally:
        for f in fleets:
            f.close()


async def test_partition_then_lock_holder_death(tmp_path: Path, redis: Any, redis_url: str) -> None:
    """SIGSTOP one supervisor's whole tree past lease_ttl: the peer reclaims, the stopped one
    rejoins under a new incarnation, reclaimed entries are not run again, ordered shards run
    only on their lease holder. Then a reclaim lock held by a 'dead' holder (taken by hand,
    short PX) delays but does not block the reclaim after a SIGKILL."""
    ns = "M15P"
    keys = StreamKeyBuilder(ns)
    inbox = keys.agent_inbox("work")
    ord_base = keys.agent_inbox("ord")
    one = start(tmp_path, "one", redis_url, ns, ordered=True)
    two = start(tmp_path, "two", redis_url, ns, ordered=True)
    fleets = [one, two]
    try:
        for f in fleets:
            ready(f)
        first = {m.name: m.incarnation for m in await members(redis, keys)}
        sent, seq = 0, 0
        while await pending_of(redis, inbox, "work", "one/") < 4 and sent < 3000:
            sent = await load(redis, inbox, sent, 40)
            seq = await _ordered_load(redis, keys, ord_base, seq, 20)
        pids = tree(one)
        signal_tree(pids, signal.SIGSTOP)
        try:
            for _ in range(5):  # load on while it is away: its peer serves everything
                sent = await load(redis, inbox, sent, 20)
                seq = await _ordered_load(redis, keys, ord_base, seq, 10)
            await eventually(
                lambda: two.find("member_reclaimed", member="one"), timeout=10, message="reclaim"
            )
            await eventually(lambda: _all_done(redis, ns, sent), timeout=20, message="peer did all")
            stopped_mark = len(_starts(one))
        finally:
            signal_tree(list(reversed(pids)), signal.SIGCONT)
        rejoined = one.wait_event("member_rejoined", timeout=10)
        assert rejoined["previous_incarnation"] == first["one"]
        assert rejoined["incarnation"] != first["one"]
        assert one.find("member_cut_off")
        sent = await load(redis, inbox, sent, 60)
        seq = await _ordered_load(redis, keys, ord_base, seq, 20)
        await eventually(lambda: _all_done(redis, ns, sent), timeout=20, message="all processed")
        await eventually(lambda: _pending_is(redis, inbox, "work", 0), timeout=10)
        # Reclaimed entries are not run again: after SIGCONT, "one" starts no entry that
        # "two" started too. Duplicates at all are only what "one" had run (or was running)
        # but not acked yet when it stopped.
        by_two = set(_starts(two))
        rerun = [key for key in _starts(one)[stopped_mark:] if key in by_two]
        assert rerun == [], rerun
        dupes = sum(v - 1 for v in (await runs(redis, ns)).values())
        assert dupes <= 4 + 100, dupes  # in flight (concurrency 4) + unacked (one ack batch)
        await eventually(lambda: _ordered_done(redis, ns, seq), timeout=20, message="ordered")
        assert await redis.lrange(f"{ns}:t:violations", 0, -1) == []
        for key in range(4):
            got = [int(v) for v in await redis.lrange(f"{ns}:t:ord:k{key}", 0, -1)]
            firsts = list(dict.fromkeys(got))
            assert firsts == sorted(firsts), (key, got)
        live = {m.name: m for m in await members(redis, keys)}
        assert live["one"].alive and live["one"].incarnation == rejoined["incarnation"]

        # A reclaim lock left by a holder that died: taken by hand for 1.5 s.
        lock = keys.supervisor_lock(f"reclaim:one:{rejoined['incarnation']}:work")
        assert await redis.set(lock, "ghost", nx=True, px=1500)
        while await pending_of(redis, inbox, "work", "one/") < 2 and sent < 6000:
            sent = await load(redis, inbox, sent, 40)
        os.killpg(one.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        one.proc.wait(5)
        done = await eventually(
            lambda: [
                e
                for e in two.find("member_reclaimed", member="one", agent="work")
                if e.get("incarnation") == rejoined["incarnation"]
            ],
            timeout=10,
            message="reclaim after the ghost lock expired",
        )
        assert time.monotonic() - killed_at >= 1.0 and done
        await eventually(lambda: _all_done(redis, ns, sent), timeout=20, message="all processed")
        await eventually(lambda: _pending_is(redis, inbox, "work", 0), timeout=10)
        assert not [c for c in await consumers(redis, inbox, "work") if c.startswith("one/")]
    finally:
        for f in fleets:
            f.close()


async def _ordered_load(redis: Any, keys: StreamKeyBuilder, base: str, seq: int, n: int) -> int:
    by_stream: dict[str, list[Envelope]] = {}
    for i in range(seq, seq + n):
        key = f"k{i % 4}"
        stream = keys.route(base, key, 4)
        shard = int(stream.rsplit(":", 1)[1])
        by_stream.setdefault(stream, []).append(Envelope(role="user", content=f"{key}:{i}:{shard}"))
    for stream, envs in by_stream.items():
        await publish_many(redis, stream, envs)
    return seq + n


async def _ordered_done(redis: Any, ns: str, seq: int) -> bool:
    seen: set[int] = set()
    for key in range(4):
        seen.update(int(v) for v in await redis.lrange(f"{ns}:t:ord:k{key}", 0, -1))
    return len(seen) == seq


async def _count_alive(redis: Any, keys: StreamKeyBuilder, n: int) -> bool:
    return len([m for m in await members(redis, keys) if m.alive]) == n


async def _all_done(redis: Any, ns: str, n: int) -> bool:
    return int(await redis.hlen(f"{ns}:t:runs")) >= n


async def _pending_is(redis: Any, stream: str, group: str, n: int) -> bool:
    return await pending(redis, stream, group) == n


async def _member_with_pending_left(
    redis: Any, keys: StreamKeyBuilder, name: str, agent: str
) -> Any:
    for member in await members(redis, keys):
        if member.name == name and member.pending_left.get(agent, 0) > 0:
            return member
    return None


async def _hlen_is(redis: Any, key: str, n: int) -> bool:
    return int(await redis.hlen(key)) >= n


def _starts(fleet: FleetProcess) -> list[str]:
    path = fleet.dir / "starts.log"
    return path.read_text().split() if path.exists() else []
