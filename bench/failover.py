"""Failover latency: SIGKILL a worker holding pending entries, time until they are acked by others.

Runs ``ag1-fleet run`` (the real daemon) against a private redis-server: one
agent, 4 workers, handler sleeping 50 ms, concurrency 8, steady load at about
half the fleet's capacity. 20 times: pick a ready worker that holds pending
entries, snapshot its pending ids, SIGKILL it, and poll until none of those
ids is pending any more (each was acked by a sibling). Prints p50/p95/max.

    .venv/bin/python bench/failover.py [--kills 20] [--rate 300] [--json]
    .venv/bin/python bench/failover.py --mode sentinel [--rounds 10]   # Redis failover
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as redis_asyncio
from fleet_process import http_port, start_fleet, stop_fleet

from core_bus.envelope import Envelope
from core_bus.publish import publish_many
from core_bus.streams.replies import text
from supervisor.redis.server import RedisServerProcess

STREAM = "AG1:agent:bench:inbox"
GROUP = "bench"

HANDLER = """
import asyncio


async def handle(env, redis):
    await asyncio.sleep(0.05)
    await redis.incr("bench:calls")
"""

FLEET = """
[supervisor]
name = "bench"
sweep_interval = "5s"
[redis]
url = "{url}"
[http]
enabled = true
listen = "127.0.0.1:0"
[[agents]]
name = "bench"
handler = "bench_agent:handle"
replicas = 4
concurrency = 8
count = 8
claim_idle = "60s"
restart = "always"
backoff_initial = "50ms"
backoff_max = "200ms"
start_limit = 1000
start_limit_window = "60s"
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def ready_workers(session: aiohttp.ClientSession, port: int) -> list[tuple[int, str]]:
    async with session.get(f"http://127.0.0.1:{port}/status") as resp:
        snap = await resp.json()
    return [
        (w["pid"], w["consumer"])
        for agent in snap["agents"]
        for w in agent["workers"]
        if w["state"] == "ready" and w["pid"] and w["consumer"]
    ]


async def publish_steadily(redis: Any, rate: float, stop: asyncio.Event) -> int:
    sent = 0
    batch = max(1, int(rate / 20))
    started = time.monotonic()
    while not stop.is_set():
        await publish_many(redis, STREAM, [Envelope(role="user") for _ in range(batch)], maxlen=0)
        sent += batch
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
    return sent


async def still_pending(redis: Any, ids: list[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
    return sum(1 for reply in await pipe.execute() if reply)


async def one_kill(
    redis: Any, session: aiohttp.ClientSession, port: int
) -> tuple[float, int] | None:
    workers = await ready_workers(session, port)
    if len(workers) < 4:
        return None
    summary = await redis.xpending(STREAM, GROUP)
    held = {text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or ()}
    candidates = [(pid, name) for pid, name in workers if held.get(name, 0) > 0]
    if not candidates:
        return None
    pid, name = max(candidates, key=lambda c: held[c[1]])
    rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 1000, consumername=name)
    ids = [text(r["message_id"]) for r in rows]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.perf_counter()
    while await still_pending(redis, ids):
        if time.perf_counter() - killed_at > 120:
            raise RuntimeError(f"entries of {name} still pending after 120 s")
        await asyncio.sleep(0.002)
    return time.perf_counter() - killed_at, len(ids)


async def run(kills: int, rate: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ag1-failover-") as tmp:
        work = Path(tmp)
        server = RedisServerProcess(data_dir=work / "redis", appendonly=False).start()
        (work / "bench_agent.py").write_text(HANDLER)
        fleet, log_path = start_fleet(work, FLEET.format(url=server.url))
        redis = redis_asyncio.Redis.from_url(server.url)
        try:
            port = http_port(log_path, timeout=30.0)
            results: list[tuple[float, int]] = []
            async with aiohttp.ClientSession() as session:
                while len(await ready_workers(session, port)) < 4:
                    await asyncio.sleep(0.05)
                stop = asyncio.Event()
                publisher = asyncio.create_task(publish_steadily(redis, rate, stop))
                await asyncio.sleep(2.0)  # reach steady state
                while len(results) < kills:
                    got = await one_kill(redis, session, port)
                    if got is None:
                        await asyncio.sleep(0.05)
                        continue
                    results.append(got)
                    print(
                        f"kill {len(results):2d}: {got[1]:3d} entries acked by siblings "
                        f"in {got[0] * 1000:7.1f} ms",
                        file=sys.stderr,
                    )
                    await asyncio.sleep(1.0)  # let the replacement come up
                stop.set()
                sent = await publisher
            while (
                int((await redis.xpending(STREAM, GROUP))["pending"])
                or int(await redis.get("bench:calls") or 0) < sent
            ):
                await asyncio.sleep(0.1)
            calls = int(await redis.get("bench:calls") or 0)
        finally:
            await redis.aclose()
            stop_fleet(fleet)
            server.kill()
    latencies = [r[0] * 1000 for r in results]
    return {
        "kills": len(results),
        "entries_per_kill_median": statistics.median(r[1] for r in results),
        "p50_ms": round(percentile(latencies, 0.5), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "max_ms": round(max(latencies), 1),
        "published": sent,
        "handler_calls": calls,
        "duplicates": calls - sent,
        "rate_per_s": rate,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=300.0, help="envelopes per second")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument(
        "--mode",
        choices=("worker", "sentinel", "cluster"),
        default="worker",
        help="worker: SIGKILL workers (this file); sentinel: Redis master failover "
        "(bench/redis_failover.py); cluster: hook for the cluster work",
    )
    parser.add_argument("--rounds", type=int, default=10, help="sentinel/cluster: faults (10)")
    parser.add_argument("--kind", choices=("kill", "failover", "both"), default="both")
    parser.add_argument("--durability", choices=("none", "replicated"), default="none")
    args = parser.parse_args()
    if args.mode == "sentinel":
        import redis_failover

        return redis_failover.main(args)
    if args.mode == "cluster":
        raise SystemExit("--mode cluster: not written yet (issue 16 part B fills this hook)")
    result = asyncio.run(run(args.kills, args.rate))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"failover after SIGKILL ({result['kills']} kills, median "
            f"{result['entries_per_kill_median']} pending entries each): "
            f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, max {result['max_ms']} ms; "
            f"{result['duplicates']} duplicates of {result['published']} envelopes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
