"""A Redis Cluster master SIGKILLed mid-load (3 masters + 3 replicas): its replica takes
over, the subscription and the publisher carry on without a restart.

Counted and printed: entries whose XADD was acknowledged but that the failover lost
(Redis replication is asynchronous: not the bus's to keep), entries handled twice, and
entries still in a stream but never handled (the bus's loss: must be zero).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster

from core_bus import Envelope, subscribe
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import publish_envelope
from core_bus.streams.errors import is_transient
from core_bus.streams.replies import entries_of
from tests.cluster_harness import RedisClusterHarness
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

KC = StreamKeyBuilder(cluster=True)
STREAMS = [KC.agent_inbox(f"fo{i}") for i in range(6)]
TOTAL = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterHarness]:
    harness = RedisClusterHarness(replicas=1).start()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
async def rc(cluster: RedisClusterHarness) -> AsyncIterator[Any]:
    client = RedisCluster.from_url(cluster.url)
    try:
        yield client
    finally:
        await client.aclose()


async def _publish_retrying(rc: Any, stream: str, env: Envelope) -> bool:
    """Publish until Redis answers; True when an XADD was acknowledged."""
    for _attempt in range(200):
        try:
            await publish_envelope(rc, stream, env)
            return True
        except Exception as exc:
            if not is_transient(exc) and "cluster" not in str(exc).lower():
                raise
            await anyio.sleep(0.05)
    return False


async def test_master_killed_mid_load_keeps_every_entry_it_still_has(
    rc: Any, cluster: RedisClusterHarness
) -> None:
    handled: list[int] = []

    async def handler(env: Envelope) -> None:
        handled.append(int(env.content))

    sub = await subscribe(rc, STREAMS, handler, group="fo", count=20, block_ms=500)
    await sub.started()
    published: set[int] = set()
    victim_port = 0
    killed_at = 0.0
    try:
        for seq in range(TOTAL):
            if seq == TOTAL // 3:
                slot = int(await rc.cluster_keyslot(STREAMS[0]))
                victim = rc.nodes_manager.get_node_from_slot(slot)
                victim_port = int(victim.port)
                os.kill(cluster.node_for_port(victim_port).pid, signal.SIGKILL)
                killed_at = time.monotonic()
            env = Envelope(role="user", content=seq)
            if await _publish_retrying(rc, STREAMS[seq % len(STREAMS)], env):
                published.add(seq)
        recovered = time.monotonic() - killed_at

        async def still_in_streams() -> set[int]:
            out: set[int] = set()
            for stream in STREAMS:
                for _id, fields in entries_of(await rc.xrange(stream)):
                    if fields:
                        out.add(int(Envelope.from_json(fields["data"]).content))
            return out

        async def caught_up() -> bool:
            return (await still_in_streams()) <= set(handled)

        await eventually(caught_up, 45, interval=0.2, message="every stored entry handled")
        stored = await still_in_streams()
    finally:
        await sub.stop()
    lost_by_redis = published - stored
    duplicates = len(handled) - len(set(handled))
    lost_by_bus = stored - set(handled)
    print(
        f"cluster failover: killed master :{victim_port}; published {len(published)}/{TOTAL} "
        f"(done {recovered:.2f}s after the kill), lost by Redis failover {len(lost_by_redis)}, "
        f"handled twice {duplicates}, stored but never handled {len(lost_by_bus)}"
    )
    assert len(published) == TOTAL
    assert victim_port not in cluster.master_ports()
    assert not lost_by_bus
