"""Host failover: SIGKILL one of three supervisors (its whole tree), time until its entries
are acked elsewhere; idle membership cost; a SIGSTOP partition.

Three ``ag1-fleet run`` processes (names h0, h1, h2, own state dirs) on one private
redis-server, one agent with 2 workers each (handler sleeps 50 ms, concurrency
8), steady load of ``--rate`` envelopes/s. ``--kills`` times: pick the next
host, snapshot the ids pending on its consumers, SIGKILL the supervisor and
every worker at once (a host dying), poll until none of those ids is pending
(each was acked by a live host), then restart that host and wait until it is
ready again. Prints p50/p95/max, then the idle cost (Redis commands per second
per idle supervisor, from INFO commandstats, membership commands separately),
then ``--partitions`` SIGSTOP cases (whole tree stopped for 3 x lease_ttl):
time until its entries were acked elsewhere, and after SIGCONT the time until
the host logged ``member_cut_off`` (workers paused) and ``member_rejoined``.

    .venv/bin/python bench/host_failover.py [--kills 20] [--rate 500] [--lease-ttl 3s]
    .venv/bin/python bench/host_failover.py --netns [--partitions 3]   # real link cuts (root)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as redis_asyncio
from fleet_process import start_fleet, stop_fleet

from core_bus.envelope import Envelope
from core_bus.publish import publish_many
from core_bus.streams.replies import text
from supervisor.redis.server import RedisServerProcess

STREAM = "AG1:agent:bench:inbox"
GROUP = "bench"
HOSTS = ("h0", "h1", "h2")

HANDLER = """
import asyncio


async def handle(env, redis):
    await asyncio.sleep(0.05)
    await redis.incr("bench:calls")
"""

FLEET = """
[supervisor]
name = "{name}"
lease_ttl = "{ttl}"
[redis]
url = "{url}"
[http]
enabled = false
[[agents]]
name = "bench"
handler = "bench_agent:handle"
replicas = 2
concurrency = 8
count = 8
claim_idle = "60s"
"""

MEMBERSHIP_COMMANDS = ("evalsha", "eval", "hgetall", "get", "pttl", "time", "set", "exists")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Host:
    def __init__(self, root: Path, name: str, url: str, ttl: str) -> None:
        self.dir = root / name
        self.dir.mkdir()
        (self.dir / "bench_agent.py").write_text(HANDLER)
        self.toml = FLEET.format(name=name, url=url, ttl=ttl)
        self.name = name
        self.proc: Any = None
        self.log = self.dir / "run.log"

    def start(self) -> None:
        if self.log.exists():
            self.log.rename(self.dir / f"run.{time.time_ns()}.log")
        self.proc, self.log = start_fleet(self.dir, self.toml)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                out.append(event)
        return out

    async def wait(self, event: str, after: int = 0, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events(event)) > after:
                return time.monotonic()
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{self.name}: no {event} within {timeout}s (see {self.log})")

    def tree(self) -> list[int]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


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


async def held_ids(redis: Any, host: str) -> list[str]:
    summary = await redis.xpending(STREAM, GROUP)
    names = [text(c["name"]) for c in summary.get("consumers") or ()]
    ids: list[str] = []
    for name in names:
        if name.startswith(host + "/"):
            rows = await redis.xpending_range(STREAM, GROUP, "-", "+", 1000, consumername=name)
            ids.extend(text(r["message_id"]) for r in rows)
    return ids


async def still_pending(redis: Any, ids: list[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xpending_range(STREAM, GROUP, entry_id, entry_id, 1)
    return sum(1 for reply in await pipe.execute() if reply)


async def until_acked(redis: Any, ids: list[str], since: float) -> float:
    while await still_pending(redis, ids):
        if time.perf_counter() - since > 120:
            raise RuntimeError("entries still pending after 120 s")
        await asyncio.sleep(0.002)
    return time.perf_counter() - since


async def one_kill(redis: Any, host: Host) -> tuple[float, int] | None:
    ids = await held_ids(redis, host.name)
    if not ids:
        return None
    pids = host.tree()
    signal_all(pids, signal.SIGKILL)  # the host dies: supervisor and workers at once
    killed_at = time.perf_counter()
    host.proc.wait(10)
    took = await until_acked(redis, ids, killed_at)
    host.start()
    await host.wait("fleet ready")
    return took, len(ids)


async def idle_cost(redis: Any, seconds: float) -> dict[str, float]:
    await redis.config_resetstat()
    await asyncio.sleep(seconds)
    stats = await redis.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    total = sum(v for k, v in calls.items() if k not in ("info", "config|resetstat"))
    member = sum(calls.get(c, 0) for c in MEMBERSHIP_COMMANDS)
    per = len(HOSTS) * seconds
    return {
        "idle_commands_per_s_per_supervisor": round(total / per, 1),
        "idle_membership_commands_per_s_per_supervisor": round(member / per, 1),
    }


async def one_partition(redis: Any, host: Host, ttl: float) -> dict[str, float] | None:
    ids = await held_ids(redis, host.name)
    if not ids:
        return None
    cut, rejoined = len(host.events("member_cut_off")), len(host.events("member_rejoined"))
    pids = host.tree()
    signal_all(pids, signal.SIGSTOP)
    stopped_at = time.perf_counter()
    took = await until_acked(redis, ids, stopped_at)
    await asyncio.sleep(max(0.0, 3 * ttl - (time.perf_counter() - stopped_at)))
    signal_all(list(reversed(pids)), signal.SIGCONT)
    resumed = time.monotonic()
    cut_at = await host.wait("member_cut_off", after=cut)
    back_at = await host.wait("member_rejoined", after=rejoined)
    return {
        "acked_elsewhere_ms": took * 1000,
        "cut_off_after_sigcont_ms": (cut_at - resumed) * 1000,
        "rejoined_after_sigcont_ms": (back_at - resumed) * 1000,
        "entries": len(ids),
    }


async def run(kills: int, rate: float, ttl_text: str, partitions: int) -> dict[str, Any]:
    ttl = float(ttl_text.rstrip("s"))
    with tempfile.TemporaryDirectory(prefix="ag1-host-failover-") as tmp:
        root = Path(tmp)
        server = RedisServerProcess(data_dir=root / "redis", appendonly=False).start()
        hosts = [Host(root, name, server.url, ttl_text) for name in HOSTS]
        redis = redis_asyncio.Redis.from_url(server.url)
        results: list[tuple[float, int]] = []
        parts: list[dict[str, float]] = []
        try:
            for host in hosts:
                host.start()
            for host in hosts:
                await host.wait("fleet ready")
            cost = await idle_cost(redis, 10.0)
            stop = asyncio.Event()
            publisher = asyncio.create_task(publish_steadily(redis, rate, stop))
            await asyncio.sleep(2.0)  # steady state
            turn = 0
            while len(results) < kills:
                got = await one_kill(redis, hosts[turn % len(hosts)])
                if got is None:
                    await asyncio.sleep(0.05)
                    continue
                turn += 1
                results.append(got)
                print(
                    f"kill {len(results):2d} ({hosts[(turn - 1) % 3].name}): {got[1]:3d} "
                    f"entries acked elsewhere in {got[0] * 1000:7.1f} ms",
                    file=sys.stderr,
                )
                await asyncio.sleep(1.0)
            while len(parts) < partitions:
                got_p = await one_partition(redis, hosts[turn % len(hosts)], ttl)
                if got_p is None:
                    await asyncio.sleep(0.05)
                    continue
                turn += 1
                parts.append(got_p)
                print(f"partition {len(parts)}: {got_p}", file=sys.stderr)
                await asyncio.sleep(1.0)
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
            for host in hosts:
                if host.proc is not None:
                    stop_fleet(host.proc)
            server.kill()
    latencies = [r[0] * 1000 for r in results]
    out: dict[str, Any] = {
        "kills": len(results),
        "entries_per_kill_median": statistics.median(r[1] for r in results),
        "p50_ms": round(percentile(latencies, 0.5), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "max_ms": round(max(latencies), 1),
        "lease_ttl_s": ttl,
        "rate_per_s": rate,
        "published": sent,
        "handler_calls": calls,
        "duplicates": calls - sent,
        **cost,
    }
    for key in ("acked_elsewhere_ms", "cut_off_after_sigcont_ms", "rejoined_after_sigcont_ms"):
        if parts:
            out[f"partition_{key}_median"] = round(statistics.median(p[key] for p in parts), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=500.0, help="envelopes per second")
    parser.add_argument("--lease-ttl", default="3s", help='[supervisor] lease_ttl, e.g. "3s"')
    parser.add_argument("--partitions", type=int, default=3, help="SIGSTOP cases")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument(
        "--netns",
        action="store_true",
        help="instead: --partitions link cuts across network-namespace hosts (root; "
        "bench/netns_partition.py)",
    )
    args = parser.parse_args()
    if args.netns:
        from netns_partition import run_netns

        result = asyncio.run(run_netns(args.partitions, args.rate, args.lease_ttl))
    else:
        result = asyncio.run(run(args.kills, args.rate, args.lease_ttl, args.partitions))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
