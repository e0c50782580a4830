"""Periodic observation: worker RSS/CPU against memory limits, Redis health and group stats.

Pure observation; the daemon decides what to do with the result (a worker over
its ``memory_limit`` is restarted gracefully, Redis health feeds ``/readyz``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.log import get_logger
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.fleet.snapshot import GroupSnapshot
from supervisor.runtime.lifecycle import WorkerState
from supervisor.runtime.resources import ResourceSampler
from supervisor.runtime.table import AgentRuntime, Worker, WorkerTable

log = get_logger("supervisor.fleet.sampling")


async def sample_workers(sampler: ResourceSampler, table: WorkerTable) -> list[Worker]:
    """Refresh each running worker's usage (psutil, in a thread); return the ready ones
    whose process tree is over their agent's ``memory_limit``."""
    running = [w for w in table.all_workers() if w.pid is not None]
    roots = [w.pid for w in running if w.pid is not None]
    try:
        usage = await anyio.to_thread.run_sync(sampler.sample, roots)
    except Exception as exc:  # psutil on a vanished /proc entry etc.
        log.debug("resource sample failed", error=str(exc))
        usage = {}
    over: list[Worker] = []
    for worker in running:
        if worker.pid is None:
            continue
        table.sampled(worker, usage.get(worker.pid))
        runtime = table.get(worker.agent)
        limit = runtime.config.memory_limit if runtime is not None else None
        if (
            limit
            and worker.usage is not None
            and worker.usage.rss_bytes > limit
            and worker.lifecycle.state == WorkerState.READY
        ):
            log.warning(
                "worker over memory limit",
                agent=worker.agent,
                worker=worker.key,
                pid=worker.pid,
                rss_bytes=worker.usage.rss_bytes,
                limit_bytes=limit,
            )
            over.append(worker)
    return over


@dataclass
class RedisHealth:
    """Last Redis probe: reachable or why not, and the groups' pending/lag."""

    up: bool = False
    error: str | None = None
    groups: list[GroupSnapshot] = field(default_factory=list)

    async def probe(
        self,
        redis: AsyncRedis,
        delivery: DeliveryHooks | None,
        agents: Iterable[AgentRuntime],
        time_limit: float,
    ) -> None:
        """PING and collect group stats; on failure keep the last groups, record why."""
        groups: list[GroupSnapshot] = []
        try:
            with anyio.fail_after(time_limit):
                await redis.ping()
                if delivery is not None:
                    for runtime in list(agents):
                        groups.extend(await delivery.group_stats(runtime))
        except Exception as exc:
            self.up = False
            self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return
        self.up = True
        self.error = None
        self.groups = groups
