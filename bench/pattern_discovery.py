"""Stream patterns under the supervisor: new-stream latency, start-up with 1,000 matches, idle CPU.

    .venv/bin/python bench/pattern_discovery.py [--new 50] [--existing 1000] [--idle 10]

Runs ``ag1-fleet run`` (a subprocess, JSON logs) on a private redis-server with one
handler agent, ``streams = ["AG1:agent:*:inbox"]``, 2 replicas, and prints one figure
per line:

* ``new_stream_latency_p50_ms`` / ``_p95_ms`` / ``_max_ms``: from just before the
  first ``publish_envelope`` to a stream that did not exist to the handler's
  timestamp of it (``--new`` streams, one after the other);
* ``startup_to_ready_ms``: with ``--existing`` matching streams (one entry each)
  created before start: from spawning the supervisor to its ``fleet ready``,
  and ``worker_ready_ms`` from a worker's spawn to its READY;
* ``backlog_drained_ms``: until every existing stream's entry was handled;
* ``idle_worker_cpu_percent``: one worker's CPU (utime+stime from /proc) over
  ``--idle`` seconds with nothing to do (100 = one core), and the supervisor's
  (its sampler and sweep resolve the pattern every 5 s).

Not part of the test suite; numbers go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_process import start_fleet, stop_fleet  # noqa: E402

from core_bus import Envelope, publish_envelope  # noqa: E402
from supervisor.redis.server import RedisServerProcess  # noqa: E402

HANDLER = """
import time


async def handle(env, redis):
    await redis.hsetnx("bench:handled", str(env.content), repr(time.time()))
"""

FLEET = """
[supervisor]
name = "bench"
[redis]
url = "{url}"
[http]
enabled = false
[[agents]]
name = "pat"
handler = "bench_agent:handle"
streams = ["AG1:agent:*:inbox"]
replicas = 2
discovery_interval = "5s"
"""


def events(log_path: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            out.append(event)
    return out


async def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check() if asyncio.iscoroutinefunction(check) else check()
        if value:
            return value
        await asyncio.sleep(0.002)
    raise RuntimeError(f"timed out waiting for {what}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stamp(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def main(new: int, existing: int, idle: float) -> None:
    with tempfile.TemporaryDirectory(prefix="ag1-bench-") as tmp:
        work = Path(tmp)
        server = RedisServerProcess(data_dir=work / "redis", appendonly=False).start()
        (work / "bench_agent.py").write_text(HANDLER)
        redis = redis_asyncio.Redis.from_url(server.url)
        fleet = None
        try:
            pipe = redis.pipeline(transaction=False)
            for i in range(existing):
                data = Envelope(role="user", content=f"old{i}").to_json()
                pipe.xadd(f"AG1:agent:old{i}:inbox", {"data": data})
            await pipe.execute()
            spawned = time.time()
            fleet, log_path = start_fleet(work, FLEET.format(url=server.url))
            ready = await wait_for(lambda: events(log_path, "fleet ready"), 120, "fleet ready")
            print(f"existing_streams: {existing}")
            print(f"startup_to_ready_ms: {(stamp(ready[0]) - spawned) * 1000:.0f}")
            started = {e["worker"]: stamp(e) for e in events(log_path, "worker started")}
            for e in events(log_path, "worker ready"):
                if e.get("worker") in started and "child_logger" not in e:
                    ms = (stamp(e) - started[e["worker"]]) * 1000
                    print(f"worker_ready_ms[{e['worker']}]: {ms:.0f}")

            async def drained() -> bool:
                return int(await redis.hlen("bench:handled")) >= existing

            await wait_for(drained, 300, "backlog")
            print(f"backlog_drained_ms: {(time.time() - spawned) * 1000:.0f}")

            latencies = []
            for i in range(new):
                stream = f"AG1:agent:new{i}:inbox"
                t0 = time.time()
                await publish_envelope(redis, stream, Envelope(role="user", content=f"new{i}"))

                async def handled(i: int = i) -> Any:
                    return await redis.hget("bench:handled", f"new{i}")

                when = float(await wait_for(handled, 30, stream))
                latencies.append((when - t0) * 1000)
            latencies.sort()
            p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
            print(f"new_streams: {new}")
            print(f"new_stream_latency_p50_ms: {statistics.median(latencies):.1f}")
            print(f"new_stream_latency_p95_ms: {p95:.1f}")
            print(f"new_stream_latency_max_ms: {latencies[-1]:.1f}")

            pid = int(next(e["pid"] for e in events(log_path, "worker started")))
            before, sup_before = cpu_seconds(pid), cpu_seconds(fleet.pid)
            t_before = time.monotonic()
            await asyncio.sleep(idle)
            elapsed = time.monotonic() - t_before
            used = cpu_seconds(pid) - before
            sup_used = cpu_seconds(fleet.pid) - sup_before
            print(f"idle_worker_cpu_percent: {used / elapsed * 100:.2f} (streams {existing + new})")
            print(f"idle_supervisor_cpu_percent: {sup_used / elapsed * 100:.2f}")
        finally:
            if fleet is not None:
                stop_fleet(fleet)
            await redis.aclose()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=50)
    parser.add_argument("--existing", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.new, args.existing, args.idle))
