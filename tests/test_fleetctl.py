"""The fleet command stream on a real Redis: followers, the host-by-host roll, failures.

Followers run in the test's loop with executors standing in for a supervisor's
restart (the real restart path is covered by ``tests/test_multihost.py``);
membership is given to the coordinator directly, so these tests do not depend
on the lease writer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.clock import redis_time_ms as redis_ms
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.commands import (
    OP_RESTART,
    Command,
    ack_of,
    command_of,
    issue,
)
from supervisor.fleetctl.follower import CommandFollower
from supervisor.fleetctl.roll import FleetRoll, roll_fleet
from supervisor.membership.directory import AgentPresence, MemberInfo
from supervisor.redis.server import RedisServerProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

KEYS = StreamKeyBuilder("T15B")


def member(name: str, *agents: str) -> MemberInfo:
    return MemberInfo(
        name=name,
        incarnation="i1",
        alive=True,
        agents={a: AgentPresence(workers=1, ready=1) for a in agents},
    )


class Host:
    """A follower plus the log of what its executor ran (Redis time at start and end)."""

    def __init__(self, redis: Any, name: str, fail: str | None = None) -> None:
        self.redis = redis
        self.ran: list[tuple[str, int, int]] = []
        self.fail = fail
        self.follower = CommandFollower(redis, KEYS, name, self.execute)

    async def execute(self, command: Command) -> str:
        started = await redis_ms(self.redis)
        await anyio.sleep(0.05)  # a roll takes a while: the next host must wait for it
        if self.fail:
            raise ControlError(self.fail)
        self.ran.append((command.agent, started, await redis_ms(self.redis)))
        return "1/1"


@asynccontextmanager
async def following(*hosts: Host) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for host in hosts:
            tg.start_soon(host.follower.run)
        for host in hosts:
            await host.follower.started.wait()
        yield
        tg.cancel_scope.cancel()


def members_of(*infos: MemberInfo) -> Callable[[], Any]:
    async def current() -> list[MemberInfo]:
        return list(infos)

    return current


async def stream(redis: Any, key: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (i.decode(), {k.decode(): v.decode() for k, v in f.items()})
        for i, f in await redis.xrange(key)
    ]


async def test_roll_goes_host_by_host_and_each_host_acks(redis: Redis) -> None:
    """Hosts get their command in name order, each only after the previous one acked;
    a member that does not run the agent gets nothing."""
    a, b, c = Host(redis, "a"), Host(redis, "b"), Host(redis, "c")
    async with following(a, b, c):
        roll = FleetRoll("r1", "echo", True, "b")
        await roll_fleet(
            redis,
            KEYS,
            roll,
            host_timeout=10,
            members=members_of(member("b", "echo"), member("a", "echo"), member("c", "other")),
        )
    assert roll.state == "done" and [h.name for h in roll.hosts] == ["a", "b"]
    assert all(h.state == "ok" and h.ready == "1/1" for h in roll.hosts)
    assert len(a.ran) == 1 and len(b.ran) == 1 and c.ran == []
    commands = [command_of(i, f) for i, f in await redis.xrange(KEYS.fleet_commands())]
    acks = [ack_of(i, f) for i, f in await redis.xrange(KEYS.fleet_command_acks())]
    assert [c.target for c in commands if c] == ["a", "b"]
    assert [x.host for x in acks if x] == ["a", "b"]
    first_ack, second_cmd = acks[0], commands[1]
    assert first_ack is not None and second_cmd is not None
    # b's command was written after a's ack, and b started after a had finished
    assert second_cmd.entry_id > first_ack.entry_id
    assert b.ran[0][1] >= a.ran[0][2]
    assert all(c is not None and c.op == OP_RESTART and c.rolling for c in commands)


async def test_failed_host_stops_the_roll(redis: Redis) -> None:
    """A host that fails acks ok=0 with its reason; the hosts after it get no command."""
    a, b = Host(redis, "a", fail="a replacement did not become ready"), Host(redis, "b")
    async with following(a, b):
        roll = FleetRoll("r2", "echo", True, "b")
        with pytest.raises(ControlError, match="stopped at a: a replacement did not become"):
            await roll_fleet(
                redis,
                KEYS,
                roll,
                host_timeout=10,
                members=members_of(member("a", "echo"), member("b", "echo")),
            )
    assert roll.state == "failed"
    assert [(h.name, h.state) for h in roll.hosts] == [("a", "failed"), ("b", "waiting")]
    assert "not started: b" in roll.error
    assert [f["target"] for _i, f in await stream(redis, KEYS.fleet_commands())] == ["a"]
    assert b.ran == []


async def test_silent_host_times_out(redis: Redis) -> None:
    """No follower answers: the roll stops with "no acknowledgement" after the deadline."""
    roll = FleetRoll("r3", "echo", True, "b")
    with pytest.raises(ControlError, match=r"no acknowledgement within 0\.3s"):
        await roll_fleet(
            redis, KEYS, roll, host_timeout=0.3, members=members_of(member("gone", "echo"))
        )


async def test_expired_command_is_not_run(redis: Redis) -> None:
    """A command whose deadline (Redis time) passed is answered ok=0, never executed."""
    host = Host(redis, "a")
    past = await redis_ms(redis) - 1
    ack = await host.follower.handle(
        Command("c1", "a", OP_RESTART, "echo", True, "b", deadline_ms=past)
    )
    assert not ack.ok and "expired" in ack.error and host.ran == []


async def test_follower_reads_blocking_and_only_its_own(redis: Redis) -> None:
    """Commands for other hosts are skipped; commands written before start are history."""
    await issue(redis, KEYS, Command("old", "a", OP_RESTART, "echo", True, "x"))
    host = Host(redis, "a")
    async with following(host):
        await issue(redis, KEYS, Command("c-b", "b", OP_RESTART, "echo", True, "x"))
        await issue(redis, KEYS, Command("c-a", "a", OP_RESTART, "mine", True, "x"))
        await eventually(lambda: host.follower.handled == 1, timeout=5)
    assert [agent for agent, _s, _e in host.ran] == ["mine"]


async def test_follower_survives_redis_loss(
    redis_server_factory: Callable[..., RedisServerProcess],
) -> None:
    """Redis SIGKILLed and restarted on the same port: the follower reconnects and runs
    a command written after the restart."""
    server = redis_server_factory(appendonly=False)
    client = Redis.from_url(server.url, socket_timeout=1.0)
    host = Host(client, "a")
    try:
        async with following(host):
            server.kill()
            await eventually(lambda: host.follower._lost, timeout=10, message="lost")
            redis_server_factory(data_dir=server.data_dir, port=server.port, appendonly=False)
            await issue(client, KEYS, Command("c1", "a", OP_RESTART, "echo", True, "x"))
            await eventually(lambda: host.follower.handled == 1, timeout=15, message="handled")
            assert not host.follower._lost
        acks = await stream(client, KEYS.fleet_command_acks())
        assert [(f["cmd"], f["ok"]) for _i, f in acks] == [("c1", "1")]
    finally:
        await client.aclose()


async def test_unexpected_read_error_is_logged_once_not_every_retry(redis: Redis) -> None:
    """A command stream key of the wrong type (WRONGTYPE, not a lost connection) used to
    write `read failed` at every retry, once a second for as long as it lasted; now one
    line, the repeats counted, and one line when the loop reads again."""
    from structlog.testing import capture_logs

    async def wrongtype_errors() -> int:
        stats = await redis.info("errorstats")  # counted since the server started
        return int(stats.get("errorstat_WRONGTYPE", {}).get("count", 0))

    key = KEYS.fleet_commands()
    before = await wrongtype_errors()
    await redis.set(key, "not a stream")
    host = Host(redis, "a")
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.follower.run)
            await eventually(
                lambda: any(e["event"] == "fleet_commands_read_failed" for e in logs), timeout=5
            )
            with anyio.fail_after(5):
                while await wrongtype_errors() < before + 4:  # four failed reads at least
                    await anyio.sleep(0.02)
            await redis.delete(key)
            with anyio.fail_after(5):
                await host.follower.started.wait()  # it knows where the stream ends now
            await issue(redis, KEYS, Command("c-a", "a", OP_RESTART, "echo", True, "x"))
            await eventually(lambda: host.follower.handled == 1, timeout=5)
            tg.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "fleet_commands_read_failed"]
    assert len(failed) == 1 and "WRONGTYPE" in failed[0]["error"], failed
    resolved = [e for e in logs if e["event"] == "fleet_commands_read_failed_resolved"]
    assert len(resolved) == 1 and resolved[0]["repeats"] >= 3, resolved
