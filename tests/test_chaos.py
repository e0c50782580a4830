"""Chaos: `ag1-fleet run` with 4 workers while a random worker is SIGKILLed every 300 ms.

20,000 envelopes are published while the kills go on for 15 s. At the end every
envelope was handled at least once, the dead-letter stream is empty, nothing is
pending and the group holds exactly the live workers' consumers (no dead
consumer left). Duplicates (at-least-once redeliveries) are counted and shown.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from core_bus.envelope import Envelope
from core_bus.publish import publish_many
from supervisor.delivery.consumers import consumers_of
from tests.fleet_harness import FleetProcess
from tests.waiting import eventually, eventually_sync

pytestmark = pytest.mark.anyio

TOTAL = 20_000
CHAOS_SECONDS = 15.0
KILL_EVERY = 0.3
STREAM = "AG1:agent:chaos:inbox"
GROUP = "chaos"
DLQ = "AG1:dlq:chaos"

HANDLER = """
import asyncio


async def handle(env, redis):
    pipe = redis.pipeline(transaction=False)
    pipe.sadd("chaos:seen", env.envelope_id)
    pipe.incr("chaos:calls")
    await pipe.execute()
    await asyncio.sleep(0.001)
"""

FLEET = """
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
max_deliveries = {max_deliveries}
claim_idle = "5s"
restart = "always"
backoff_initial = "10ms"
backoff_max = "100ms"
start_limit = 10000
start_limit_window = "60s"
stop_timeout = "2s"
"""


async def status(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/status") as resp,
    ):
        return await resp.json()  # type: ignore[no-any-return]


async def live_consumers(port: int) -> set[str]:
    snap = await status(port)
    return {
        w["consumer"]
        for agent in snap["agents"]
        for w in agent["workers"]
        if w["state"] == "ready" and w["consumer"]
    }


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_chaos_sigkill_every_300ms_loses_nothing(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    """20,000 envelopes, 4 workers, a random worker SIGKILLed every 300 ms for 15 s:
    every envelope handled at least once, DLQ empty, nothing pending, no dead
    consumer left in the group; the duplicate count is reported."""
    (tmp_path / "chaos_agent.py").write_text(HANDLER)
    fleet = FleetProcess(tmp_path, FLEET.format(url=redis_url, max_deliveries=10))
    try:
        eventually_sync(lambda: fleet.events("fleet ready"), 30, message="fleet ready")
        port = int(fleet.events("http_listening")[-1]["port"])
        envelopes = [Envelope(role="user", content=i) for i in range(TOTAL)]
        kills = 0

        async def publish_steadily() -> None:
            batch = 250
            pause = (CHAOS_SECONDS * 0.8) / (TOTAL / batch)
            for start in range(0, TOTAL, batch):
                await publish_many(redis, STREAM, envelopes[start : start + batch], maxlen=0)
                await anyio.sleep(pause)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_steadily)
            rng = random.Random(5)
            while time.monotonic() - started < CHAOS_SECONDS:
                await anyio.sleep(KILL_EVERY)
                pids = sorted(fleet.worker_pids())
                if pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass

        async def all_seen() -> bool:
            return int(await redis.scard("chaos:seen")) == TOTAL

        await eventually(all_seen, 60, interval=0.2, message="every envelope handled")

        async def settled() -> bool:
            pending = int((await redis.xpending(STREAM, GROUP))["pending"])
            names = {c.name for c in await consumers_of(redis, STREAM, GROUP)}
            live = await live_consumers(port)
            return pending == 0 and len(live) == 4 and names == live

        await eventually(settled, 30, interval=0.2, message="nothing pending, no dead consumer")
        assert await redis.xlen(DLQ) == 0
        calls = int(await redis.get("chaos:calls"))
        elapsed = time.monotonic() - started
        snap = await status(port)
        agent = snap["agents"][0]
        summary = {
            "envelopes": TOTAL,
            "kills": kills,
            "handler_calls": calls,
            "duplicates": calls - TOTAL,
            "seconds_to_all_handled": round(elapsed, 1),
            "reclaimed_by_reason": agent["reclaimed_by_reason"],
            "deleted_consumers": agent["deleted_consumers_total"],
        }
        print("CHAOS", json.dumps(summary))
        assert kills >= 30
    finally:
        fleet.close()
