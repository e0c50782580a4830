"""Probe latency under load, and message throughput during a rolling restart.

Runs ``ag1-fleet run`` (the real daemon) against a private redis-server with one
agent (``replicas`` workers, a handler doing one Redis INCR):

1. **Probes.** While a publisher offers a steady load (``--rate`` envelopes/s),
   a separate prober process hits ``/livez`` and then ``/status`` at
   ``--probe-rate`` requests/s each (open loop: requests leave on schedule over
   keep-alive connections, not after the previous answer; latency is counted
   from the scheduled send time) and reports p50/p99/max latency.
2. **Throughput during a roll.** A backlog keeps the workers saturated; the
   drain rate is measured over a steady window, then over a rolling restart
   (``POST /v1/agents/bench/restart {"rolling": true}``) while ``/readyz`` is
   polled every 10 ms to show it stays 200.
3. **A roll below capacity.** The same roll while ``--roll-rate`` envelopes/s
   are offered (the production case): processed rate and the largest backlog.

    .venv/bin/python bench/probe_load.py [--rate 1000] [--probe-rate 500] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis.asyncio as redis_asyncio
from fleet_process import http_port, start_fleet, stop_fleet

from core_bus.envelope import Envelope
from core_bus.publish import publish_many
from supervisor.redis.server import RedisServerProcess

AGENT = "bench"
STREAM = f"AG1:agent:{AGENT}:inbox"

HANDLER = """
async def handle(env, redis):
    await redis.incr("bench:calls")
"""

FLEET = """
[supervisor]
name = "probe-bench"
stop_timeout = "10s"
[redis]
url = "{url}"
[http]
listen = "127.0.0.1:0"
request_timeout = "5s"
[[agents]]
name = "{agent}"
handler = "bench_agent:handle"
replicas = {replicas}
concurrency = 32
count = 100
max_surge = 1
max_unavailable = 0
claim_idle = "60s"
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ----------------------------------------------------------------------------- prober process


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough for a GET probe.

    A hand-written client costs ~10x less CPU per request than aiohttp's, so on
    a small shared machine the prober disturbs what it measures far less.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def probe(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop GETs of ``url`` at ``rate``/s for ``seconds``; latencies in ms.

    Requests leave on schedule over a pool of keep-alive connections (a new one
    is opened when all are busy). Latency runs from the scheduled send time, so
    a stall of the prober itself counts against the result, never in its favour.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    late = 0
    reconnects = 0
    idle: list[_Connection] = [await _Connection.open(host, port) for _ in range(8)]
    opened = len(idle)

    async def one(scheduled: float) -> None:
        nonlocal errors, opened, reconnects
        reused = bool(idle)
        if idle:
            conn = idle.pop()
        else:
            conn = await _Connection.open(host, port)
            opened += 1
        try:
            try:
                code = await asyncio.wait_for(conn.get(request), 10)
            except (ConnectionError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # The server closed this idle keep-alive connection (its
                # keepalive_timeout); like any HTTP client, retry on a new one.
                conn.close()
                reconnects += 1
                conn = await _Connection.open(host, port)
                code = await asyncio.wait_for(conn.get(request), 10)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            errors += 1
            conn.close()
            return
        latencies.append((time.perf_counter() - scheduled) * 1000)
        statuses[code] = statuses.get(code, 0) + 1
        idle.append(conn)

    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1  # the prober itself fell behind its schedule
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for conn in idle:
        conn.close()
    return {
        "url": url,
        "requests": total,
        "achieved_rps": round(total / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "statuses": statuses,
        "errors": errors,
        "sent_late": late,
        "connections": opened,
        "reconnects_after_idle_close": reconnects,
    }


def run_prober(url: str, rate: float, seconds: float) -> subprocess.Popen[bytes]:
    """The prober in its own process, so its CPU does not disturb the publisher's loop."""
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--probe",
            url,
            "--probe-rate",
            str(rate),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
    )


async def prober_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = await asyncio.to_thread(proc.communicate)
    if proc.returncode != 0:
        raise RuntimeError(f"prober failed with exit {proc.returncode}")
    return json.loads(out)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- fleet helpers


async def agent_status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/status") as resp:
        snap = await resp.json()
    return next(a for a in snap["agents"] if a["name"] == AGENT)  # type: ignore[no-any-return]


async def wait_ready(session: aiohttp.ClientSession, base: str, replicas: int) -> set[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        agent = await agent_status(session, base)
        ready = {w["pid"] for w in agent["workers"] if w["state"] == "ready"}
        if len(ready) >= replicas and agent["ready_replicas"] >= replicas:
            return ready
        await asyncio.sleep(0.1)
    raise RuntimeError("workers did not become ready")


async def publish_steadily(redis: Any, rate: float, stop: asyncio.Event) -> int:
    sent = 0
    batch = max(1, int(rate / 50))
    started = time.monotonic()
    while not stop.is_set():
        await publish_many(redis, STREAM, [Envelope(role="user") for _ in range(batch)], maxlen=0)
        sent += batch
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
    return sent


async def group_lag(redis: Any) -> int:
    """Entries not yet delivered to the group (XLEN when Redis cannot tell)."""
    groups = await redis.xinfo_groups(STREAM)
    lag = groups[0].get("lag") if groups else None
    return int(lag) if lag is not None else int(await redis.xlen(STREAM))


async def calls(redis: Any) -> int:
    return int(await redis.get("bench:calls") or 0)


async def drain_rate(redis: Any, seconds: float) -> float:
    start_calls, start = await calls(redis), time.perf_counter()
    await asyncio.sleep(seconds)
    return (await calls(redis) - start_calls) / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- phases


async def probes_under_load(
    redis: Any, base: str, rate: float, probe_rate: float, seconds: float
) -> dict[str, Any]:
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish_steadily(redis, rate, stop))
    await asyncio.sleep(2.0)  # reach steady state
    before = await calls(redis)
    started = time.perf_counter()
    results = {}
    for path in ("/livez", "/status"):
        results[path] = await prober_result(run_prober(base + path, probe_rate, seconds))
    processed_rate = (await calls(redis) - before) / (time.perf_counter() - started)
    stop.set()
    sent = await publisher
    return {
        "offered_msgs_per_s": rate,
        "processed_msgs_per_s": round(processed_rate, 1),
        "published": sent,
        "probes": results,
    }


async def rolling_restart(
    session: aiohttp.ClientSession, base: str, replicas: int, sample: Any = None
) -> dict[str, Any]:
    """Roll the agent over HTTP; wait until only new workers run; poll /readyz meanwhile.

    ``sample`` (an async callable) is awaited every 50 ms during the roll.
    """
    old = {w["pid"] for w in (await agent_status(session, base))["workers"]}
    readyz: dict[int, int] = {}
    rolled = asyncio.Event()

    async def watch_readyz() -> None:
        while not rolled.is_set():
            async with session.get(base + "/readyz") as resp:
                readyz[resp.status] = readyz.get(resp.status, 0) + 1
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_readyz())
    started = time.perf_counter()
    async with session.post(base + f"/v1/agents/{AGENT}/restart", json={"rolling": True}) as resp:
        accepted = resp.status
    while True:
        agent = await agent_status(session, base)
        pids = {w["pid"] for w in agent["workers"] if w["state"] == "ready"}
        if not (pids & old) and len(pids) >= replicas and len(agent["workers"]) == replicas:
            break
        if time.perf_counter() - started > 120:
            raise RuntimeError("the rolling restart did not finish within 120 s")
        if sample is not None:
            await sample()
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    rolled.set()
    await watcher
    return {"seconds": seconds, "http_status": accepted, "readyz": readyz}


async def throughput_during_roll(
    redis: Any,
    session: aiohttp.ClientSession,
    base: str,
    replicas: int,
    backlog: int,
    steady_seconds: float,
) -> dict[str, Any]:
    """Saturated: drain rate of a standing backlog, steady vs during a roll."""
    # A topper keeps the undelivered backlog above ``backlog`` through both
    # windows (the same extra load in both).
    saturated = asyncio.Event()
    done = asyncio.Event()
    ran_dry = 0

    async def keep_backlog() -> None:
        nonlocal ran_dry
        while not done.is_set():
            lag = await group_lag(redis)
            if lag < backlog:
                if saturated.is_set() and lag == 0:
                    ran_dry += 1
                chunk = [Envelope(role="user") for _ in range(5000)]
                await publish_many(redis, STREAM, chunk, maxlen=0)
            else:
                saturated.set()
                await asyncio.sleep(0.05)

    topper = asyncio.create_task(keep_backlog())
    await saturated.wait()
    await asyncio.sleep(1.0)  # workers reach full speed
    steady = await drain_rate(redis, steady_seconds)
    start_calls = await calls(redis)
    roll = await rolling_restart(session, base, replicas)
    during = (await calls(redis) - start_calls) / roll["seconds"]
    done.set()
    await topper
    if ran_dry:
        print("warning: the backlog ran dry; raise --backlog", file=sys.stderr)
    return {
        "backlog": backlog,
        "steady_msgs_per_s": round(steady, 1),
        "roll_msgs_per_s": round(during, 1),
        "roll_vs_steady": round(during / steady, 3) if steady else None,
        "roll_seconds": round(roll["seconds"], 2),
        "restart_http_status": roll["http_status"],
        "backlog_ran_dry": ran_dry,
        "readyz_during_roll": roll["readyz"],
    }


async def roll_under_offered_load(
    redis: Any,
    session: aiohttp.ClientSession,
    base: str,
    replicas: int,
    rate: float,
    steady_seconds: float,
) -> dict[str, Any]:
    """Below capacity (the production case): does a roll keep up with the offered load?"""
    while await group_lag(redis) > 0:  # start from an empty backlog
        await asyncio.sleep(0.1)
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish_steadily(redis, rate, stop))
    await asyncio.sleep(2.0)
    steady = await drain_rate(redis, steady_seconds)
    max_lag = 0

    async def sample() -> None:
        nonlocal max_lag
        max_lag = max(max_lag, await group_lag(redis))

    start_calls = await calls(redis)
    roll = await rolling_restart(session, base, replicas, sample)
    during = (await calls(redis) - start_calls) / roll["seconds"]
    stop.set()
    await publisher
    return {
        "offered_msgs_per_s": rate,
        "steady_msgs_per_s": round(steady, 1),
        "roll_msgs_per_s": round(during, 1),
        "roll_vs_steady": round(during / steady, 3) if steady else None,
        "roll_seconds": round(roll["seconds"], 2),
        "max_backlog_during_roll": max_lag,
        "readyz_during_roll": roll["readyz"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ag1-probe-bench-") as tmp:
        work = Path(tmp)
        server = RedisServerProcess(data_dir=work / "redis", appendonly=False).start()
        (work / "bench_agent.py").write_text(HANDLER)
        toml = FLEET.format(url=server.url, agent=AGENT, replicas=args.replicas)
        fleet, log_path = start_fleet(work, toml)
        redis = redis_asyncio.Redis.from_url(server.url)
        try:
            base = f"http://127.0.0.1:{http_port(log_path)}"
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base, args.replicas)
                probes = await probes_under_load(
                    redis, base, args.rate, args.probe_rate, args.seconds
                )
                roll = await throughput_during_roll(
                    redis, session, base, args.replicas, args.backlog, args.seconds
                )
                offered_roll = await roll_under_offered_load(
                    redis, session, base, args.replicas, args.roll_rate, args.seconds
                )
        finally:
            await redis.aclose()
            stop_fleet(fleet)
            server.kill()
    return {
        "replicas": args.replicas,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 1),
        **probes,
        "roll": roll,
        "roll_offered": offered_roll,
    }


def _probe_main(args: argparse.Namespace) -> int:
    """Prober subprocess: prints its result as JSON."""
    print(json.dumps(asyncio.run(probe(args.probe, args.probe_rate, args.seconds))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="steady envelopes/s")
    parser.add_argument("--probe-rate", type=float, default=500.0, help="probe requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument(
        "--roll-rate", type=float, default=2000.0, help="offered envelopes/s in the last phase"
    )
    parser.add_argument(
        "--backlog", type=int, default=50_000, help="undelivered entries kept in the roll phase"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run as the prober
    args = parser.parse_args()
    if args.probe:
        return _probe_main(args)
    load_before = round(os.getloadavg()[0], 1)
    result = asyncio.run(run(args))
    result["loadavg_1m_at_start"] = load_before
    if args.json:
        print(json.dumps(result))
        return 0
    for path, r in result["probes"].items():
        print(
            f"{path:8s} at {r['achieved_rps']:.0f} req/s under {result['offered_msgs_per_s']:.0f} "
            f"msgs/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms, "
            f"statuses {r['statuses']}, errors {r['errors']}"
        )
    roll = result["roll"]
    print(
        f"machine load average (1 min): {result['loadavg_1m_at_start']} at start, "
        f"{result['loadavg_1m_at_end']} at end"
    )
    print(
        f"throughput: steady {roll['steady_msgs_per_s']:.0f} msgs/s, during a rolling restart of "
        f"{result['replicas']} workers ({roll['roll_seconds']} s) {roll['roll_msgs_per_s']:.0f} "
        f"msgs/s = {roll['roll_vs_steady']:.0%}; /readyz during the roll: "
        f"{roll['readyz_during_roll']}"
    )
    offered = result["roll_offered"]
    print(
        f"below capacity: {offered['offered_msgs_per_s']:.0f} msgs/s offered, processed "
        f"{offered['steady_msgs_per_s']:.0f} msgs/s steady and {offered['roll_msgs_per_s']:.0f} "
        f"during a roll ({offered['roll_seconds']} s) = {offered['roll_vs_steady']:.0%}; "
        f"largest backlog {offered['max_backlog_during_roll']}; /readyz "
        f"{offered['readyz_during_roll']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
