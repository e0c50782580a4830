"""Redis failover: time from a master SIGKILL / ``SENTINEL FAILOVER`` to the fleet processing again.

A Sentinel deployment on loopback (1 master, 1 replica, 3 sentinels,
``down-after-milliseconds 1000``; ``tests/sentinel_harness.py``) and ``ag1-fleet
run`` in sentinel mode (2 workers). A publisher sends an envelope every 5 ms
carrying its send time; the handler appends (handled time, send time) to a
file. Each round: the fault, then wait until the deployment has settled and an
envelope sent after that was handled; the figure is the longest gap between
two handled envelopes in the round (the publisher never pauses on purpose),
i.e. how long the fleet stopped processing. The killed server is restarted as
a replica as soon as the promotion is seen. Prints p50/p95/max per fault kind.

    .venv/bin/python bench/failover.py --mode sentinel [--rounds 10] [--kind kill|failover|both]
    .venv/bin/python bench/redis_failover.py [--rounds 10] [--kind both] [--durability none]

``--mode cluster`` of bench/failover.py is a hook for the cluster work (issue 16 part B).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.sentinel_harness

from fleet_process import http_port, start_fleet, stop_fleet

from core_bus.envelope import Envelope
from core_bus.errors import ReplicationTimeout
from core_bus.publish import publish_envelope
from core_bus.settings import connect
from core_bus.streams.errors import is_transient
from tests.sentinel_harness import SentinelSet

STREAM = "AG1:agent:bench:inbox"

HANDLER = """
import os
import time


async def handle(env, redis):
    with open(os.environ["SEEN_FILE"], "a") as out:
        out.write(f"{time.time()} {env.content}\\n")
"""

FLEET = """
[supervisor]
name = "bench"
sweep_interval = "1s"
[redis]
# sentinel mode: the URL gives only credentials and db (port 1: nothing may use its host)
url = "redis://127.0.0.1:1/0"
mode = "sentinel"
sentinels = {sentinels}
master_name = "{master}"
durability = "{durability}"
[http]
enabled = true
listen = "127.0.0.1:0"
[[agents]]
name = "bench"
handler = "bench_agent:handle"
replicas = 2
concurrency = 8
env = {{ SEEN_FILE = "{seen}" }}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def publish_steadily(deployment: SentinelSet, durability: str, stop: asyncio.Event) -> None:
    client = connect(mode="sentinel", sentinels=deployment.addresses, master_name="ag1")
    try:
        while not stop.is_set():
            try:
                env = Envelope(role="user", content=time.time())
                await asyncio.wait_for(
                    publish_envelope(client, STREAM, env, durability=durability), 3
                )
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, TimeoutError | ReplicationTimeout)):
                    raise
                await asyncio.sleep(0.02)
                continue
            await asyncio.sleep(0.005)
    finally:
        await client.aclose()


def handled_after(seen: Path, t0: float) -> float | None:
    """The earliest handling time of an envelope sent after ``t0``."""
    best: float | None = None
    for line in seen.read_text().splitlines():
        handled, sent = (float(x) for x in line.split())
        if sent > t0 and (best is None or handled < best):
            best = handled
    return best


def handled_times(seen: Path, since: float) -> list[float]:
    times = []
    for line in seen.read_text().splitlines():
        handled = float(line.split()[0])
        if handled >= since:
            times.append(handled)
    return sorted(times)


async def one_round(deployment: SentinelSet, seen: Path, kind: str) -> float:
    """One fault; returns the longest stretch without any envelope handled around it.

    The publisher sends every 5 ms throughout, so that gap is how long the fleet
    stopped processing (a SIGKILL: detection + election + promotion + the clients'
    reconnect backoff). The killed server is restarted as a replica as soon as the
    promotion is seen, as the tests do, and the round ends once the deployment has
    settled and processing was seen again."""
    t0 = time.time()
    fault = deployment.kill_master if kind == "kill" else deployment.failover
    await asyncio.to_thread(fault)
    settled = time.time()
    while handled_after(seen, settled) is None:
        if time.time() - t0 > 60:
            raise RuntimeError("the fleet did not process anything for 60 s")
        await asyncio.sleep(0.01)
    times = handled_times(seen, t0 - 0.05)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def run(rounds: int, kinds: list[str], durability: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ag1-redis-failover-") as tmp:
        work = Path(tmp)
        deployment = SentinelSet(work / "sentinel").start()
        seen = work / "seen.txt"
        seen.touch()
        (work / "bench_agent.py").write_text(HANDLER)
        toml = FLEET.format(
            sentinels=json.dumps(deployment.addresses),
            master=deployment.master_name,
            durability=durability,
            seen=seen,
        )
        fleet, log_path = start_fleet(work, toml)
        results: dict[str, list[float]] = {kind: [] for kind in kinds}
        try:
            http_port(log_path, timeout=30.0)
            stop = asyncio.Event()
            publisher = asyncio.create_task(publish_steadily(deployment, durability, stop))
            while handled_after(seen, time.time() - 1) is None:
                await asyncio.sleep(0.05)
            for index in range(rounds):
                for kind in kinds:
                    took = await one_round(deployment, seen, kind)
                    results[kind].append(took * 1000)
                    print(f"{kind:8s} {index + 1:2d}: {took * 1000:7.0f} ms", file=sys.stderr)
            stop.set()
            await publisher
        finally:
            stop_fleet(fleet)
            deployment.close()
    return {
        kind: {
            "rounds": len(values),
            "p50_ms": round(percentile(values, 0.5)),
            "p95_ms": round(percentile(values, 0.95)),
            "max_ms": round(max(values)),
            "mean_ms": round(statistics.mean(values)),
        }
        for kind, values in results.items()
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="faults of each kind (10)")
    parser.add_argument("--kind", choices=("kill", "failover", "both"), default="both")
    parser.add_argument("--durability", choices=("none", "replicated"), default="none")


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(parser)
        parser.add_argument("--json", action="store_true")
        args = parser.parse_args()
    kinds = ["kill", "failover"] if args.kind == "both" else [args.kind]
    result = asyncio.run(run(args.rounds, kinds, args.durability))
    if getattr(args, "json", False):
        print(json.dumps(result))
        return 0
    for kind, figures in result.items():
        what = "master SIGKILL" if kind == "kill" else "SENTINEL FAILOVER"
        print(
            f"sentinel {what} -> processing again ({figures['rounds']} rounds, durability "
            f"{args.durability}): p50 {figures['p50_ms']} ms, p95 {figures['p95_ms']} ms, "
            f"max {figures['max_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
