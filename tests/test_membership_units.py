"""Membership building blocks on a real Redis: lease scripts, the directory, worker pause.

Fast, in process. The lease of a supervisor declared dead is never quietly
extended (renew refuses, a rejoin takes a new incarnation); a leave removes the
lease and writes ``departed``; the directory reports heartbeat age from PTTL; a
paused subscription takes nothing until it is resumed. None of it exists on
the code before issue 15.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest

from core_bus import Envelope, publish_many
from core_bus.consume.subscription import subscribe
from core_bus.keys import StreamKeyBuilder
from supervisor.membership.directory import departed, live_members, members
from supervisor.membership.lease import MemberLease
from tests.test_metrics import exposition, rich_snapshot, samples
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

KEYS = StreamKeyBuilder("M15U")
BASE = {"host": "h", "pid": 1, "http": None, "agents": {"a": {"workers": 2, "ready": 1}}}


async def test_lease_renew_refuses_after_expiry_and_leave_records_departure(redis: Any) -> None:
    """Renew only extends our own incarnation; an expired lease forces a rejoin with a new
    incarnation (closing the dead one's record with departed 'expired'); leave drops the
    lease and the record and XADDs departed 'left'."""
    lease = MemberLease(redis, KEYS, "s1", ttl_ms=1000)
    assert await lease.join(BASE) == ""
    first = lease.incarnation
    assert await lease.renew(BASE)
    [info] = await live_members(redis, KEYS)
    assert info.name == "s1" and info.incarnation == first and info.agents["a"].ready == 1
    assert info.heartbeat_age_ms is not None and 0 <= info.heartbeat_age_ms < 1000
    await redis.delete(KEYS.fleet_lease("s1"))  # as if it expired
    assert not await lease.renew(BASE)
    [dead] = await members(redis, KEYS)
    assert not dead.alive and dead.lease_incarnation is None
    await lease.join(BASE)
    assert lease.incarnation != first
    assert await lease.leave({})
    assert await redis.exists(KEYS.fleet_lease("s1")) == 0
    assert await members(redis, KEYS) == []
    gone, closed = await departed(redis, KEYS)  # newest first
    assert (gone.name, gone.reason, gone.incarnation) == ("s1", "left", lease.incarnation)
    # the rejoin closed the dead incarnation's record peers had not retired yet
    assert (closed.reason, closed.incarnation) == ("expired", first)


async def test_leave_with_entries_left_keeps_the_record_for_peers(redis: Any) -> None:
    """A graceful stop that left entries pending keeps its record (lease gone, left=true)
    so a live peer reclaims them; departed carries pending_left."""
    lease = MemberLease(redis, KEYS, "s2", ttl_ms=1000)
    await lease.join(BASE)
    assert await lease.leave({"a": 3})
    [info] = await members(redis, KEYS)
    assert info.left and not info.alive and info.lease_incarnation is None
    [gone] = await departed(redis, KEYS)
    assert gone.pending_left == {"a": 3}


async def test_paused_subscription_takes_nothing_until_resumed(redis: Any) -> None:
    """pause(): no entry is read or started; resume(): ownership re-checked, then all run."""
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        seen.append(str(env.content))

    stream = "M15U:agent:p:inbox"
    sub = await subscribe(
        redis, stream, handler, "p", "p-1", claim_idle=30.0, ownership_fence=2.0, block_ms=100
    )
    try:
        await sub.started()
        sub.pause()
        await publish_many(redis, stream, [Envelope(role="user", content=i) for i in range(5)])
        await anyio.sleep(0.5)  # a paused reader must not take them: nothing to wait for
        assert seen == []
        sub.resume()
        await eventually(lambda: len(seen) == 5, timeout=5)
    finally:
        await sub.stop(2.0)


def test_fleet_metrics_from_the_membership_view() -> None:
    """ag1_fleet_members (alive/dead), cut-off, rejoins and per-dead-member reclaims are
    exposed with a supervisor label; no membership view, no fleet families."""
    view = {
        "members": 2,
        "dead_members": 1,
        "cut_off": False,
        "rejoins": 1,
        "reclaimed_entries": {"h0": 7},
        "expired_seen": 1,
    }
    got = samples(exposition(replace(rich_snapshot(), membership=view)))
    me = ("supervisor", "test-host")
    assert got[("ag1_fleet_members", (("state", "alive"), me))] == 2
    assert got[("ag1_fleet_members", (("state", "dead"), me))] == 1
    assert got[("ag1_fleet_cut_off", (me,))] == 0
    assert got[("ag1_fleet_rejoins_total", (me,))] == 1
    assert got[("ag1_fleet_reclaimed_entries_total", (("member", "h0"), me))] == 7
    assert got[("ag1_fleet_members_expired_total", (me,))] == 1
    assert not [k for k in samples(exposition(rich_snapshot())) if k[0].startswith("ag1_fleet")]
