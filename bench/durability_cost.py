"""Cost of ``durability = "replicated"``: publish and consume msgs/s, none vs replicated.

A private master + replica pair on loopback (``redis-server --replicaof``; no
sentinel needed for WAIT). For each durability: ``publish_envelope`` one at a
time (one round trip each; replicated adds WAIT to the same pipeline),
``publish_many`` in batches of 100 (one WAIT per batch), then a
``subscribe()`` with a no-op handler consuming everything (acks batched;
replicated ends each ack flush with WAIT). Prints one ``name: N msgs/s`` line
per figure (best of ``--rounds``) and the ratio.

    .venv/bin/python bench/durability_cost.py [--messages 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core_bus import Envelope, subscribe  # noqa: E402
from core_bus.publish import publish_envelope, publish_many  # noqa: E402
from core_bus.settings import connect, get_settings  # noqa: E402
from supervisor.redis.server import RedisServerProcess  # noqa: E402


def envelopes(n: int) -> list[Envelope]:
    return [Envelope(role="user", content="x" * 300, agent_name="bench") for _ in range(n)]


async def one_by_one(r: Any, stream: str, envs: list[Envelope], durability: str) -> float:
    start = time.perf_counter()
    for env in envs:
        await publish_envelope(r, stream, env, maxlen=0, durability=durability)
    return len(envs) / (time.perf_counter() - start)


async def batched(r: Any, stream: str, envs: list[Envelope], durability: str) -> float:
    start = time.perf_counter()
    await publish_many(r, stream, envs, maxlen=0, batch_size=100, durability=durability)
    return len(envs) / (time.perf_counter() - start)


async def consume(r: Any, stream: str, n: int) -> float:
    """Until every entry is handled *and acked* (``stats.processed`` counts acks)."""

    async def noop(_env: Envelope) -> None:
        pass

    start = time.perf_counter()
    sub = await subscribe(r, stream, noop, group="bench", count=100, concurrency=32)
    while sub.stats.processed < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - start
    await sub.stop()
    return n / elapsed


async def round_for(url: str, durability: str, n: int, tag: str) -> dict[str, float]:
    os.environ["REDIS_DURABILITY"] = durability  # what a worker gets from the supervisor
    get_settings.cache_clear()
    r = connect(url)
    try:
        envs = envelopes(n)
        single = await one_by_one(r, f"bench:{tag}:single", envs[: n // 5], durability)
        many = await batched(r, f"bench:{tag}:many", envs, durability)
        consumed = await consume(r, f"bench:{tag}:many", n)
        stats = await r.info("commandstats")
        waits = int(stats.get("cmdstat_wait", {}).get("calls", 0))
    finally:
        await r.aclose()
    return {"publish_one": single, "publish_many": many, "consume": consumed, "waits": waits}


async def replica_online(url: str) -> None:
    r = connect(url, mode="standalone")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            slave = (await r.info("replication")).get("slave0")
            if isinstance(slave, dict) and slave.get("state") == "online":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the replica did not come online within 30 s")
    finally:
        await r.aclose()


async def run(n: int, rounds: int) -> None:
    from core_bus.log import configure_logging

    configure_logging(json=False, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="ag1-durability-") as tmp:
        work = Path(tmp)
        master = RedisServerProcess(work / "m", appendonly=False).start()
        replica = RedisServerProcess(
            work / "r", appendonly=False, extra_args=["--replicaof", "127.0.0.1", str(master.port)]
        ).start()
        try:
            await replica_online(master.url)
            best: dict[str, dict[str, float]] = {}
            for index in range(rounds):
                for durability in ("none", "replicated"):
                    got = await round_for(master.url, durability, n, f"{durability}{index}")
                    mine = best.setdefault(durability, {})
                    for key, value in got.items():
                        mine[key] = max(mine.get(key, 0.0), value)
        finally:
            replica.kill()
            master.kill()
    for name in ("publish_one", "publish_many", "consume"):
        none, replicated = best["none"][name], best["replicated"][name]
        print(f"{name} durability=none: {none:,.0f} msgs/s")
        print(f"{name} durability=replicated: {replicated:,.0f} msgs/s ({replicated / none:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
