"""Bus throughput: raw redis-py vs publish_many / subscribe() on a private redis-server.

    .venv/bin/python bench/bus_throughput.py [--messages 100000] [--rounds 3]

Prints one ``name: N msgs/s`` line per figure (best of ``--rounds``) and the ratios.
Not part of the test suite; see docs/BENCHMARKS.md for recorded numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core_bus import Envelope, publish_many, subscribe  # noqa: E402
from supervisor.redis.server import RedisServerProcess  # noqa: E402

BATCH = 1000
COUNT = 100


def make_envelopes(n: int) -> list[Envelope]:
    """Envelopes of about 400 bytes of JSON each."""
    probe = len(Envelope(role="user", content="").to_json())
    pad = "x" * max(0, 400 - probe)
    return [Envelope(role="user", content=pad, agent_name="bench") for _ in range(n)]


async def raw_xadd(r: Any, stream: str, envs: list[Envelope]) -> float:
    start = time.perf_counter()
    for i in range(0, len(envs), BATCH):
        pipe = r.pipeline(transaction=False)
        for env in envs[i : i + BATCH]:
            pipe.xadd(stream, {"data": env.to_json()})
        await pipe.execute()
    return len(envs) / (time.perf_counter() - start)


async def bus_publish(r: Any, stream: str, envs: list[Envelope]) -> float:
    start = time.perf_counter()
    await publish_many(r, stream, envs, maxlen=0, batch_size=BATCH)
    return len(envs) / (time.perf_counter() - start)


async def raw_consume(r: Any, stream: str, n: int) -> tuple[float, float]:
    await r.xgroup_create(stream, "raw", id="0")
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while done < n:
        reply = await r.xreadgroup("raw", "c", {stream: ">"}, count=COUNT, block=1000)
        if not reply:
            continue
        ids = [entry_id for entry_id, _fields in reply[0][1]]
        await r.xack(stream, "raw", *ids)
        done += len(ids)
    elapsed = time.perf_counter() - start
    return n / elapsed, (time.process_time() - cpu) / n * 1e6


async def bus_consume(r: Any, stream: str, n: int) -> tuple[float, float]:
    async def noop(env: Envelope) -> None:
        pass

    cpu = time.process_time()
    start = time.perf_counter()
    sub = await subscribe(r, stream, noop, group="bus", count=COUNT)
    while sub.stats.processed < n:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - start
    cpu_per_msg = (time.process_time() - cpu) / n * 1e6
    await sub.stop()
    return n / elapsed, cpu_per_msg


async def run(messages: int, rounds: int) -> None:
    from core_bus.log import configure_logging

    configure_logging(json=False, level="WARNING")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServerProcess(data_dir=Path(tmp), appendonly=False).start()
        try:
            r = redis_asyncio.Redis.from_url(server.url)
            envs = make_envelopes(messages)
            size = len(envs[0].to_json())
            # The bench's own 100k envelopes must not make every GC pass slower for
            # the code under test: move them out of the collector's generations.
            gc.collect()
            gc.freeze()
            best: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for i in range(rounds):
                await r.flushall()
                results = {
                    "raw_xadd": await raw_xadd(r, f"raw:{i}", envs),
                    "publish_many": await bus_publish(r, f"bus:{i}", envs),
                }
                results["raw_consume"], raw_cpu = await raw_consume(r, f"raw:{i}", messages)
                results["subscribe"], bus_cpu = await bus_consume(r, f"bus:{i}", messages)
                cpu["raw_consume"] = min(cpu.get("raw_consume", 1e9), raw_cpu)
                cpu["subscribe"] = min(cpu.get("subscribe", 1e9), bus_cpu)
                for name, value in results.items():
                    best[name] = max(best.get(name, 0.0), value)
            await r.aclose()
        finally:
            server.kill()
    load_after = os.getloadavg()[0]
    print(f"messages: {messages} x {rounds} rounds, envelope: {size} bytes")
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    print(f"redis: {'.'.join(map(str, server.version))}")
    for name, value in best.items():
        print(f"{name}: {value:,.0f} msgs/s")
    print(f"ratio publish_many/raw_xadd: {best['publish_many'] / best['raw_xadd']:.2f}")
    print(f"ratio subscribe/raw_consume: {best['subscribe'] / best['raw_consume']:.2f}")
    # Client CPU per message (process time): less sensitive to a busy machine.
    for name, value in cpu.items():
        print(f"{name}_cpu: {value:.1f} us/msg")
    print(f"ratio cpu raw_consume/subscribe: {cpu['raw_consume'] / cpu['subscribe']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.rounds))


if __name__ == "__main__":
    main()
