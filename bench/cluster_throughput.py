"""Throughput on a 3-master Redis Cluster vs one standalone node, and scaling with shards.

For each setup (standalone with 1 shard; cluster with 1, 3 and 6 shards of one
agent's inbox, each shard its own hash tag so shards spread over the masters):
publish ``--messages`` envelopes (~400 B) round-robin over the shards with
``publish_many`` (pipelined; on the cluster the pipeline is split per node), then
``--workers`` worker processes, already subscribed-ready, are told to go and
consume them with ``subscribe()`` (no-op handler, count 100); the time until
every shard's group has no lag and nothing pending gives the consume rate.

    .venv/bin/python bench/cluster_throughput.py [--messages 20000] [--workers 2]

Prints one ``setup: publish N msgs/s, consume N msgs/s`` line per setup, then the
cost of one XREADGROUP on the cluster client with and without redis-py's routing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core_bus import Envelope, publish_many  # noqa: E402
from core_bus.keys import StreamKeyBuilder  # noqa: E402
from core_bus.streams.slots import routed_xreadgroup  # noqa: E402
from supervisor.redis.server import RedisServerProcess  # noqa: E402
from tests.cluster_harness import RedisClusterHarness  # noqa: E402

GROUP = "bench"

WORKER = """
import asyncio, sys
from core_bus import subscribe
from core_bus.settings import connect

url, mode, streams = sys.argv[1], sys.argv[2], sys.argv[3].split(",")

async def noop(env):
    pass

async def main():
    r = connect(url, mode=mode)
    await r.ping()
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sub = await subscribe(r, streams, noop, group="bench", count=100, concurrency=32)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await sub.stop()
    await r.aclose()

asyncio.run(main())
"""


def envelopes(n: int) -> list[Envelope]:
    probe = len(Envelope(role="user", content="").to_json())
    pad = "x" * max(0, 400 - probe)
    return [Envelope(role="user", content=pad, agent_name="bench") for _ in range(n)]


async def drained(r: Any, streams: list[str]) -> bool:
    for stream in streams:
        for info in await r.xinfo_groups(stream):
            mine = info["name"] in (GROUP, GROUP.encode())
            if mine and (info.get("lag") or info.get("pending")):
                return False
    return True


async def run_setup(
    label: str, url: str, mode: str, streams: list[str], messages: int, workers: int
) -> str:
    r: Any = RedisCluster.from_url(url) if mode == "cluster" else redis_asyncio.from_url(url)
    await r.flushall()
    for stream in streams:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    envs = envelopes(messages)
    start = time.perf_counter()
    per = len(envs) // len(streams)
    for i, stream in enumerate(streams):
        await publish_many(r, stream, envs[i * per : (i + 1) * per], maxlen=0, batch_size=1000)
    publish_rate = per * len(streams) / (time.perf_counter() - start)
    env = dict(os.environ, PYTHONPATH=str(ROOT), AG1_LOG_LEVEL="WARNING")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, mode, ",".join(streams)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(workers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        while not await drained(r, streams):
            await asyncio.sleep(0.02)
        consume_rate = per * len(streams) / (time.perf_counter() - start)
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("stop\n")
            p.stdin.flush()
        for p in procs:
            p.wait(20)
        await r.aclose()
    return (
        f"{label}: publish {publish_rate:,.0f} msgs/s, "
        f"consume ({workers} workers) {consume_rate:,.0f} msgs/s"
    )


async def read_cost(url: str, reads: int = 2000) -> str:
    """Microseconds per empty XREADGROUP: redis-py's routing (COMMAND GETKEYS first)
    vs :func:`core_bus.streams.slots.routed_xreadgroup` (the slot's node directly)."""
    r = RedisCluster.from_url(url)
    stream = StreamKeyBuilder(cluster=True).agent_inbox("cost")
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    spec = {stream: ">"}
    start = time.perf_counter()
    for _ in range(reads):
        await r.xreadgroup(GROUP, "c", spec, count=100)  # type: ignore[arg-type]
    plain = (time.perf_counter() - start) / reads * 1e6
    start = time.perf_counter()
    for _ in range(reads):
        await routed_xreadgroup(r, GROUP, "c", spec, 100, None)
    routed = (time.perf_counter() - start) / reads * 1e6
    await r.aclose()
    return (
        f"cluster XREADGROUP: redis-py routing {plain:.0f} us, "
        f"routed to the slot's node {routed:.0f} us"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    plain, tagged = StreamKeyBuilder(), StreamKeyBuilder(cluster=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServerProcess(data_dir=Path(tmp), appendonly=False).start()
        try:
            print(
                await run_setup(
                    "standalone shards=1",
                    server.url,
                    "standalone",
                    [plain.agent_inbox("bench")],
                    args.messages,
                    args.workers,
                ),
                flush=True,
            )
            for shards in (3, 6):
                streams = plain.shard_streams(plain.agent_inbox("bench"), shards)
                line = await run_setup(
                    f"standalone shards={shards}",
                    server.url,
                    "standalone",
                    streams,
                    args.messages,
                    args.workers,
                )
                print(line, flush=True)
        finally:
            server.kill()
    cluster = RedisClusterHarness().start()
    try:
        for shards in (1, 3, 6):
            base = tagged.agent_inbox("bench")
            streams = [base] if shards == 1 else tagged.shard_streams(base, shards)
            line = await run_setup(
                f"cluster(3 masters) shards={shards}",
                cluster.url,
                "cluster",
                streams,
                args.messages,
                args.workers,
            )
            print(line, flush=True)
        print(await read_cost(cluster.url), flush=True)
    finally:
        cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
