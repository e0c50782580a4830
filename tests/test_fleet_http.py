"""``GET /v1/fleet`` and fleet restarts over the real HTTP server, on a real Redis.

The daemon is ``FakeControl`` holding a real :class:`FleetCommands`; the
membership records are written here in the data model of
``supervisor.membership.directory`` (what the lease keeper writes), so the
view's reading, ages and notes are pinned without running supervisors
(``tests/test_multihost.py`` does that across namespaces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from core_bus.keys import StreamKeyBuilder
from supervisor.cli.fleet import format_fleet
from supervisor.fleetctl.service import FleetCommands
from tests.test_http import fetch, serve
from tests.test_http_fakes import FakeControl

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

KEYS = StreamKeyBuilder("AG1")


@dataclass
class FleetFake(FakeControl):
    fleet: FleetCommands | None = None


async def add_member(redis: Redis, name: str, *, live: bool, **agents: int) -> None:
    record = {
        "name": name,
        "incarnation": f"{name}-inc",
        "host": f"{name}.example",
        "pid": 42,
        "started_ms": 1,
        "lease_ttl_ms": 3000,
        "http": "127.0.0.1:8765",
        "agents": {
            a: {"workers": n, "ready": n, "consumers": [], "rolling": False}
            for a, n in agents.items()
        },
    }
    await redis.hset(KEYS.fleet_members(), name, json.dumps(record))
    if live:
        await redis.set(KEYS.fleet_lease(name), f"{name}-inc", px=3000)


async def test_fleet_view_lists_live_and_departed(redis: Redis) -> None:
    """Live members with agents and a heartbeat age from PTTL; a departed member with
    what was reclaimed and, for an agent no live member runs, why entries still wait."""
    await add_member(redis, "h1", live=True, echo=2)
    await add_member(redis, "h2", live=True, echo=1, ledger=1)
    await redis.xadd(
        KEYS.fleet_departed(),
        {
            "name": "h3",
            "incarnation": "h3-inc",
            "reason": "expired",
            "at_ms": "1",
            "reclaimed_by": "h1",
            "reclaimed": json.dumps({"echo": 7}),
            "pending_left": json.dumps({"billing": 3}),
            "note": "",
        },
    )
    control = FleetFake(fleet=FleetCommands(redis, KEYS, "h2"))
    async with serve(control, token="s3cret") as url:
        status, _body = await fetch("GET", url + "/v1/fleet")
        assert status == 401  # same token rule as the control endpoints
        status, view = await fetch(
            "GET", url + "/v1/fleet", headers={"Authorization": "Bearer s3cret"}
        )
    assert status == 200, view
    assert view["asked"] == "h2"
    assert [m["name"] for m in view["members"]] == ["h1", "h2"]
    h1 = view["members"][0]
    assert h1["agents"]["echo"]["ready"] == 2 and h1["host"] == "h1.example"
    assert 0 <= h1["heartbeat_age_ms"] < 3000
    (h3,) = view["departed"]
    assert h3["reclaimed"] == {"echo": 7} and h3["reclaimed_by"] == "h1"
    assert h3["notes"] == ["3 entries of billing wait: no live supervisor runs agent billing"]
    text = format_fleet(view)
    assert "fleet: 2 live supervisor(s) (asked h2)" in text
    (row,) = [line for line in text.splitlines() if line.startswith("  h3  ")]
    assert row.split()[:3] == ["h3", "h3-inc", "expired"]
    assert "h1" in row and "echo 7" in row and "billing 3" in row
    assert sum(line.split()[:2] == ["AGENT", "WORKERS"] for line in text.splitlines()) == 2


async def test_fleet_restart_bodies_and_refusals(redis: Redis) -> None:
    """Bad fleet restart bodies are 400; an agent no live member runs is 409 with the
    reason; a supervisor without fleet support answers 404 to GET /v1/fleet."""
    await add_member(redis, "h1", live=True, echo=2)
    await add_member(redis, "h9", live=False, other=1)
    control = FleetFake(fleet=FleetCommands(redis, KEYS, "h1"))
    async with serve(control) as url:
        restart = url + "/v1/agents/echo/restart"
        for body, expected in [
            ({"fleet": "yes"}, '"fleet" must be true or false'),
            ({"fleet": True, "timeout": "soon"}, '"timeout" must be a number'),
            ({"fleet": True, "timeout": 0}, '"timeout" must be a number'),
            ({"fleet": True, "extra": 1}, "unknown field(s): extra"),
        ]:
            status, reply = await fetch("POST", restart, json_body=body)
            assert status == 400 and expected in reply["error"], (body, reply)
        status, reply = await fetch(
            "POST", url + "/v1/agents/other/restart", json_body={"fleet": True, "rolling": True}
        )
        assert status == 409
        assert reply["error"] == "no live supervisor runs agent 'other'"
        assert control.calls == []  # nothing ran locally
        status, view = await fetch("GET", url + "/v1/fleet")
        assert status == 200 and view["last_roll"]["state"] == "failed"
    async with serve(FakeControl()) as url:
        status, reply = await fetch("GET", url + "/v1/fleet")
        assert status == 404 and "no fleet view" in reply["error"]


def test_status_text_of_an_empty_fleet() -> None:
    """No member yet: one line that says so (and no crash on missing fields)."""
    assert format_fleet({"asked": "h1", "members": []}) == (
        "fleet: 0 live supervisor(s) (asked h1)"
    )
