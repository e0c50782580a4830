"""One bad message never takes healthy ones with it (issue 13), end to end.

Real supervisor, real worker processes, real redis-server: a handler that calls
``os._exit(1)`` on poison messages among healthy ones. Exactly the poison
entries are dead-lettered (reason ``worker_crashed``, with the exit status and
the attempts), every healthy one is processed, and the agent never goes fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core_bus import DeadLetter, Envelope, StreamKeyBuilder, publish_many
from core_bus.streams.deadletter import REASON_CRASHED
from core_bus.streams.replies import entries_of
from tests.fleet_harness import agent, agent_toml, fleet_toml, running
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

POISON_HANDLER = """
import os


async def handle(env, redis):
    if env.content == "poison":
        os._exit(1)
    await redis.sadd("poison:done", env.envelope_id)
"""

INBOX = "AG1:agent:pois:inbox"


async def dead_letters(redis: Any) -> list[DeadLetter]:
    raw = await redis.xrange(StreamKeyBuilder().dead_letter("pois"))
    return [DeadLetter.from_fields(i, f) for i, f in entries_of(raw) if f is not None]


async def _run(
    tmp_path: Path, redis: Any, redis_url: str, *, healthy: int, poison: int, replicas: int
) -> None:
    (tmp_path / "pois_agent.py").write_text(POISON_HANDLER)
    toml = fleet_toml(
        agent_toml("pois", handler="pois_agent:handle", replicas=replicas, stop_timeout="2s"),
        url=redis_url,
    )
    envs = [Envelope(role="user", content=i) for i in range(healthy)]
    step = max(1, healthy // (poison + 1))
    for k in range(poison):
        envs.insert((k + 1) * step + k, Envelope(role="user", content="poison"))
    poison_ids = {e.envelope_id for e in envs if e.content == "poison"}
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "pois").ready_replicas == replicas, timeout=30)
        await publish_many(redis, INBOX, envs)

        async def done() -> bool:
            return (
                await redis.scard("poison:done") == healthy
                and len(await dead_letters(redis)) == poison
            )

        await eventually(done, timeout=120, interval=0.2, message="healthy done, poison dead")
        snap = agent(daemon, "pois")
        assert snap.state != "fatal", snap.last_error
        assert all(w.state != "fatal" for w in snap.workers)
    letters = await dead_letters(redis)
    assert len(letters) == poison
    for letter in letters:
        assert letter.reason == REASON_CRASHED, letter
        assert Envelope.from_json(letter.data or b"").envelope_id in poison_ids
        assert letter.deliveries == 5
        assert "exit 1" in letter.error and "5 attempts" in letter.error
    assert await redis.scard("poison:done") == healthy
    assert int((await redis.xpending(INBOX, "pois"))["pending"]) == 0


@pytest.mark.timeout(200)
async def test_one_poison_among_many_two_replicas(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """1 poison among 1,000 (2 replicas, count 100, concurrency 16): only it is dead-lettered."""
    await _run(tmp_path, redis, redis_url, healthy=1000, poison=1, replicas=2)


@pytest.mark.timeout(200)
async def test_three_poison_single_replica_never_fatal(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """1 replica, 3 poison: never fatal, the 3 are dead-lettered, 500 healthy done."""
    await _run(tmp_path, redis, redis_url, healthy=500, poison=3, replicas=1)
