"""Partition across real (namespace) hosts: ``host_failover.py --netns``.

Three supervisors, each in its own network namespace (``tests/netns_harness.py``;
root and iproute2 needed), Redis in a fourth, one agent with 2 workers per host
(handler sleeps 50 ms, concurrency 8) under a steady ``--rate`` load published
over Redis's unix socket. ``--partitions`` times: take the next host, note the
ids pending on its consumers, set its link down (no packet passes, no RST),
then measure

- ``cut_off_logged``: until the host itself logged ``member_cut_off`` (it found
  it could not renew its lease and paused its workers: it stops taking work);
- ``acked_elsewhere``: until none of the ids it held is pending any more (each
  was acked by another host after the cut-off host's lease expired);

keep the link down for 3 x lease_ttl, bring it up and measure ``rejoined``:
until the host logged ``member_rejoined`` (new incarnation). Prints medians.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.netns_harness

from host_failover import (
    GROUP,
    HANDLER,
    STREAM,
    held_ids,
    percentile,
    publish_steadily,
    until_acked,
)

from tests.netns_harness import NetnsHost, NetnsLab, netns_unavailable

FLEET = """
[supervisor]
name = "{name}"
lease_ttl = "{ttl}"
state_dir = "{dir}/state"
[redis]
url = "{url}"
[http]
listen = "127.0.0.1:8765"
[[agents]]
name = "bench"
handler = "bench_agent:handle"
replicas = 2
concurrency = 8
count = 8
claim_idle = "60s"
"""


async def logged(host: NetnsHost, event: str, after: int, timeout: float = 60.0) -> float:
    """perf_counter() when ``host``'s log has more than ``after`` ``event`` lines."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if len(host.events(event)) > after:
            return time.perf_counter()
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{host.name}: no {event} within {timeout}s (see {host.log_path})")


async def one_cut(
    lab: NetnsLab, redis: Any, host: NetnsHost, ttl: float
) -> dict[str, float] | None:
    ids = await held_ids(redis, host.name)
    if not ids:
        return None
    cut_before = len(host.events("member_cut_off"))
    back_before = len(host.events("member_rejoined"))
    lab.cut(host)
    cut_at = time.perf_counter()
    try:
        cut_off, acked = await asyncio.gather(
            logged(host, "member_cut_off", cut_before),
            until_acked(redis, ids, cut_at),
        )
        await asyncio.sleep(max(0.0, 3 * ttl - (time.perf_counter() - cut_at)))
    finally:
        lab.heal(host)
    healed_at = time.perf_counter()
    back = await logged(host, "member_rejoined", back_before)
    return {
        "cut_off_logged_ms": (cut_off - cut_at) * 1000,
        "acked_elsewhere_ms": acked * 1000,
        "rejoined_after_heal_ms": (back - healed_at) * 1000,
        "entries": len(ids),
    }


async def run_netns(partitions: int, rate: float, ttl_text: str) -> dict[str, Any]:
    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(f"--netns: {reason}")
    ttl = float(ttl_text.rstrip("s"))
    with tempfile.TemporaryDirectory(prefix="ag1-netns-partition-") as tmp:
        lab = NetnsLab(Path(tmp), hosts=3).build()
        parts: list[dict[str, float]] = []
        try:
            redis = redis_asyncio.Redis.from_url(lab.local_url)
            hosts = list(lab.members.values())
            for host in hosts:
                (host.dir / "bench_agent.py").write_text(HANDLER)
                toml = FLEET.format(name=host.name, ttl=ttl_text, dir=host.dir, url=lab.redis_url)
                lab.start_supervisor(host, toml)
            for host in hosts:
                await logged(host, "fleet ready", 0)
            stop = asyncio.Event()
            publisher = asyncio.create_task(publish_steadily(redis, rate, stop))
            await asyncio.sleep(2.0)  # steady state
            turn = 0
            while len(parts) < partitions:
                got = await one_cut(lab, redis, hosts[turn % len(hosts)], ttl)
                if got is None:
                    await asyncio.sleep(0.05)
                    continue
                turn += 1
                parts.append(got)
                print(f"cut {len(parts)} ({hosts[(turn - 1) % 3].name}): {got}", file=sys.stderr)
                await asyncio.sleep(1.0)
            stop.set()
            sent = await publisher
            while (
                int((await redis.xpending(STREAM, GROUP))["pending"])
                or int(await redis.get("bench:calls") or 0) < sent
            ):
                await asyncio.sleep(0.1)
            calls = int(await redis.get("bench:calls") or 0)
            await redis.aclose()
        finally:
            lab.close()
    out: dict[str, Any] = {"partitions": len(parts), "lease_ttl_s": ttl, "rate_per_s": rate}
    for key in ("cut_off_logged_ms", "acked_elsewhere_ms", "rejoined_after_heal_ms"):
        values = [p[key] for p in parts]
        out[f"netns_{key}_median"] = round(statistics.median(values), 1)
        out[f"netns_{key}_max"] = round(max(values), 1)
    out["netns_acked_elsewhere_ms_p95"] = round(
        percentile([p["acked_elsewhere_ms"] for p in parts], 0.95), 1
    )
    out["entries_per_cut_median"] = statistics.median(p["entries"] for p in parts)
    out["published"], out["handler_calls"], out["duplicates"] = sent, calls, calls - sent
    return out
