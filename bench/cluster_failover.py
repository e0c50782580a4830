"""Redis Cluster failover: time from SIGKILL of a master to the bus processing again.

A 3-master + 3-replica cluster on loopback (``cluster-node-timeout`` = ``--node-timeout``
ms). One ``subscribe()`` reads a tagged inbox; a publisher adds an envelope every 5 ms.
``--kills`` times: SIGKILL the master owning the inbox's slot, then measure until the
handler runs an envelope published after the kill (the replica was promoted, the
client found it, the subscription read again). The killed node is restarted (it
rejoins as a replica) and the cluster waited on before the next round.

    .venv/bin/python bench/cluster_failover.py [--kills 10] [--node-timeout 1000]

Prints one line per kill and ``p50``/``p95``/``max`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core_bus import Envelope, subscribe  # noqa: E402
from core_bus.keys import StreamKeyBuilder  # noqa: E402
from core_bus.log import configure_logging  # noqa: E402
from core_bus.publish import publish_envelope  # noqa: E402
from tests.cluster_harness import RedisClusterHarness  # noqa: E402

INBOX = StreamKeyBuilder(cluster=True).agent_inbox("failover")


async def one_kill(rc: Any, cluster: RedisClusterHarness, state: dict[str, Any]) -> float:
    slot = int(await rc.cluster_keyslot(INBOX))
    port = int(rc.nodes_manager.get_node_from_slot(slot).port)
    node = cluster.node_for_port(port)
    killed = time.time()
    state["killed"] = killed
    state["back"] = asyncio.get_running_loop().create_future()
    os.kill(node.pid, signal.SIGKILL)
    back: float = await asyncio.wait_for(state["back"], 60)
    node.start()  # same port and nodes.conf: rejoins as a replica of the new master
    cluster.wait_ok(60)
    return back - killed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--node-timeout", type=int, default=1000)
    args = parser.parse_args()
    configure_logging(level="ERROR")
    cluster = RedisClusterHarness(replicas=1, node_timeout_ms=args.node_timeout).start()
    state: dict[str, Any] = {"killed": None, "back": None}
    try:
        rc = RedisCluster.from_url(cluster.url)

        async def handler(env: Envelope) -> None:
            killed, back = state["killed"], state["back"]
            if killed and back is not None and not back.done() and env.content > killed:
                back.set_result(time.time())

        sub = await subscribe(rc, INBOX, handler, group="fo", block_ms=500)
        await sub.started()

        async def publisher() -> None:
            while True:
                with contextlib.suppress(Exception):  # the master is down: try again
                    await publish_envelope(rc, INBOX, Envelope(role="user", content=time.time()))
                await asyncio.sleep(0.005)

        task = asyncio.create_task(publisher())
        times = []
        for i in range(args.kills):
            took = await one_kill(rc, cluster, state)
            times.append(took)
            print(f"kill {i + 1}: processing again after {took:.2f}s", flush=True)
        task.cancel()
        await sub.stop()
        await rc.aclose()
    finally:
        cluster.close()
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    print(
        f"cluster master kill -> processing again (node-timeout {args.node_timeout} ms, "
        f"{len(times)} kills): p50 {statistics.median(times):.2f}s, p95 {p95:.2f}s, "
        f"max {times[-1]:.2f}s"
    )


if __name__ == "__main__":
    asyncio.run(main())
