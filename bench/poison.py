"""Poison isolation figures (issue 13): healthy messages processed, dead letters by reason,
collateral (healthy ones dead-lettered: must be 0) and time to drain.

One fleet (4 replicas, defaults unless told) against a private redis-server; the
handler ``os._exit(1)``s on "poison", hangs on "hang", raises on "raise"; "deep"
entries are 1,000-deep nested JSON. Run it on the current tree, or on an old tree
with ``PYTHONPATH=<old tree> python bench/poison.py --old`` (no new config keys).

    python bench/poison.py [--messages 10000] [--handler-timeout 2s] [--cap 180]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_process import start_fleet, stop_fleet

from core_bus.envelope import Envelope
from supervisor.redis.server import RedisServerProcess

HANDLER = """
import os

import anyio


async def handle(env, redis):
    kind = env.content if isinstance(env.content, str) else "ok"
    if kind == "poison":
        os._exit(1)
    if kind == "hang":
        await anyio.sleep(10**6)
    if kind == "raise":
        raise RuntimeError("bad message")
    await redis.sadd("bench:done", env.envelope_id)
"""

INBOX = "AG1:agent:pois:inbox"
DLQ = "AG1:dlq:pois"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--bad", type=int, default=10, help="of each bad kind")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--handler-timeout", default="2s")
    parser.add_argument("--cap", type=float, default=180.0, help="give up after (s)")
    parser.add_argument("--old", action="store_true", help="no issue-13 config keys")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ag1-poison-") as tmp:
        work = Path(tmp)
        server = RedisServerProcess(data_dir=work / "redis", appendonly=False).start()
        try:
            run(args, work, server.url)
        finally:
            server.stop()


def run(args: argparse.Namespace, work: Path, url: str) -> None:
    (work / "pois_agent.py").write_text(HANDLER)
    extra = "" if args.old else f'handler_timeout = "{args.handler_timeout}"\n'
    toml = f"""
        [supervisor]
        name = "bench"
        [redis]
        url = "{url}"
        [http]
        enabled = false
        [[agents]]
        name = "pois"
        handler = "pois_agent:handle"
        replicas = {args.replicas}
        {extra}
    """
    r = redis.Redis.from_url(url)
    healthy = args.messages - 4 * args.bad
    kinds = ["ok"] * healthy + ["poison", "hang", "raise", "deep"] * args.bad
    random.Random(13).shuffle(kinds)
    bad_ids: set[str] = set()
    payloads: list[bytes] = []
    for kind in kinds:
        if kind == "deep":
            payloads.append(('{"role":"user","content":' + "[" * 1000 + "]" * 1000 + "}").encode())
            continue
        env = Envelope(role="user", content=kind if kind != "ok" else len(payloads))
        if kind != "ok":
            bad_ids.add(env.envelope_id)
        payloads.append(env.to_json())
    fleet, log_path = start_fleet(work, toml)
    try:
        deadline = time.monotonic() + 60
        while not r.exists(INBOX) or not r.xinfo_groups(INBOX):
            if time.monotonic() > deadline or fleet.poll() is not None:
                raise SystemExit(f"fleet did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        time.sleep(1.0)  # let every replica subscribe (bench only)
        pipe = r.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(INBOX, {"data": payload})
        pipe.execute()
        started = time.monotonic()
        drained_at = None
        while time.monotonic() - started < args.cap:
            pending = int(r.xpending(INBOX, "pois")["pending"])
            lag = r.xinfo_groups(INBOX)[0].get("lag")
            if pending == 0 and lag == 0:
                drained_at = time.monotonic() - started
                break
            time.sleep(0.2)
        report(r, args, healthy, bad_ids, drained_at, log_path)
    finally:
        stop_fleet(fleet)


def report(
    r: redis.Redis,
    args: argparse.Namespace,
    healthy: int,
    bad_ids: set[str],
    drained_at: float | None,
    log_path: Path,
) -> None:
    reasons: Counter[str] = Counter()
    collateral = 0
    for _id, fields in r.xrange(DLQ):
        reasons[fields.get(b"reason", b"?").decode()] += 1
        data = fields.get(b"data") or b""
        try:
            env_id = json.loads(data).get("envelope_id")
        except (ValueError, RecursionError, AttributeError):
            continue  # the deep-JSON ones
        if env_id not in bad_ids:
            collateral += 1
    fatal = sum(
        1 for line in log_path.read_text(errors="replace").splitlines() if '"worker fatal"' in line
    )
    pending = int(r.xpending(INBOX, "pois")["pending"])
    print(
        f"messages {args.messages} (bad: {args.bad} each of poison/hang/raise/deep), "
        f"replicas {args.replicas}, handler_timeout {'-' if args.old else args.handler_timeout}"
    )
    print(f"healthy processed: {r.scard('bench:done')} / {healthy}")
    print("dead-lettered: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    print(f"collateral (healthy dead-lettered): {collateral}")
    print(f"still pending at the end: {pending}")
    print(f"worker fatal events: {fatal}")
    drain = (
        f"{drained_at:.1f} s" if drained_at is not None else f"not drained within {args.cap:g} s"
    )
    print(f"time to drain: {drain}")


if __name__ == "__main__":
    main()
