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


#: How often the readiness ping runs, and how long one may take: /readyz turns 503
#: within PING_INTERVAL + PING_TIMEOUT (< 1 s) of losing Redis, and back as fast.
PING_INTERVAL = 0.25
PING_TIMEOUT = 0.5


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer to PING within {PING_TIMEOUT:g}s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class RedisHealth:
    """Redis reachability (from :meth:`ping_loop`) and the groups' pending/lag (from
    :meth:`probe`). ``error`` says why it is down; None before the first answer."""

    up: bool = False
    error: str | None = "not reached yet"
    groups: list[GroupSnapshot] = field(default_factory=list)

    async def ping_loop(
        self, url: str, interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT
    ) -> None:
        """PING on a private connection every ``interval``; log once per change of state.

        Its own client with short timeouts: the daemon's shared client waits up
        to 5 s on a dead socket, and readiness must not wait behind a sweep.
        """
        from core_bus.settings import connect

        client = connect(
            url,
            socket_timeout=ping_timeout,
            socket_connect_timeout=ping_timeout,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        try:
            while True:
                try:
                    with anyio.fail_after(ping_timeout):
                        await client.ping()
                except Exception as exc:
                    self._set(False, _describe(exc))
                else:
                    self._set(True, None)
                await anyio.sleep(interval)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _set(self, up: bool, error: str | None) -> None:
        if up and not self.up:
            log.info("redis reachable")
        elif not up and (self.up or self.error is None or self.error == "not reached yet"):
            log.warning("redis unreachable", error=error)
        self.up = up
        self.error = error

    async def probe(
        self,
        redis: AsyncRedis,
        delivery: DeliveryHooks | None,
        agents: Iterable[AgentRuntime],
        time_limit: float,
    ) -> None:
        """Collect group stats; on failure keep the last ones (reachability is the ping's)."""
        groups: list[GroupSnapshot] = []
        try:
            with anyio.fail_after(time_limit):
                if delivery is not None:
                    for runtime in list(agents):
                        groups.extend(await delivery.group_stats(runtime))
        except Exception as exc:
            log.debug("group stats failed", error=_describe(exc))
            return
        self.groups = groups
