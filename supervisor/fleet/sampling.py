"""Periodic observation: worker RSS/CPU against memory limits, Redis health and group stats.

Pure observation; the daemon decides what to do with the result (a worker over
its ``memory_limit`` is restarted gracefully, Redis health feeds ``/readyz``).
Memory limits are checked twice: by the full psutil sample every few seconds
and, between samples, by :func:`guard_memory` several times a second (only the
resident size of the trees the last sample found), so a worker that leaks tens
of MB per message is stopped within a fraction of a second of crossing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.log import get_logger
from core_bus.streams.orphans import namespace_groups, orphans, record_groups
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.fleet.snapshot import GroupSnapshot
from supervisor.runtime.lifecycle import WorkerState
from supervisor.runtime.resources import ResourceSampler, Usage, resident_bytes
from supervisor.runtime.table import AgentRuntime, Worker, WorkerTable

log = get_logger("supervisor.fleet.sampling")

#: Orphan groups are looked for this often (a SCAN of the namespace, not every sample).
ORPHAN_SCAN_INTERVAL = 60.0


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
        if _over_limit(table, worker, "sample"):
            over.append(worker)
    return over


#: How often :func:`guard_memory` re-reads the RSS of workers that have a memory limit.
GUARD_INTERVAL = 0.2


def _limit_of(table: WorkerTable, worker: Worker) -> int | None:
    runtime = table.get(worker.agent)
    return runtime.config.memory_limit if runtime is not None else None


def _over_limit(table: WorkerTable, worker: Worker, check: str) -> bool:
    """A READY worker whose last reading is above its agent's ``memory_limit`` (logged)."""
    limit = _limit_of(table, worker)
    if (
        not limit
        or worker.usage is None
        or worker.usage.rss_bytes <= limit
        or worker.lifecycle.state != WorkerState.READY
    ):
        return False
    log.warning(
        "worker over memory limit",
        agent=worker.agent,
        worker=worker.key,
        pid=worker.pid,
        rss_bytes=worker.usage.rss_bytes,
        limit_bytes=limit,
        check=check,
    )
    return True


async def guard_memory(sampler: ResourceSampler, table: WorkerTable) -> list[Worker]:
    """Re-read the RSS of READY workers with a ``memory_limit`` (``/proc/<pid>/statm`` of
    the tree members the last full sample found, in a thread); return those over it.

    The reading replaces the RSS in the worker's usage (CPU stays the full
    sample's), so ``/status`` shows it too. A child started after the last full
    sample is counted from the next one (at most one sample interval later).
    """
    guarded = [
        w
        for w in table.all_workers()
        if w.pid is not None and w.lifecycle.state == WorkerState.READY and _limit_of(table, w)
    ]
    if not guarded:
        return []
    pids = [w.pid for w in guarded]
    trees = [sampler.members(pid) for pid in pids if pid is not None]
    readings = await anyio.to_thread.run_sync(lambda: [resident_bytes(t) for t in trees])
    over: list[Worker] = []
    for worker, pid, rss in zip(guarded, pids, readings, strict=True):
        if rss is None or worker.pid != pid:  # replaced while we read: not its reading
            continue
        cpu = worker.usage.cpu_percent if worker.usage is not None else 0.0
        table.sampled(worker, Usage(rss, cpu))
        if _over_limit(table, worker, "guard"):
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
    """Redis reachability (from :meth:`ping_loop`: ``error`` says why it is down), the
    groups' pending/lag, each agent's dead-letter stream length and the namespace's
    orphan groups (no fleet reads them), from :meth:`probe`.

    Each probe also records the plan's groups in Redis when they changed (start,
    reload), so ``ag1-bus groups`` can tell orphans too.
    """

    up: bool = False
    error: str | None = "not reached yet"
    groups: list[GroupSnapshot] = field(default_factory=list)
    dlq_lengths: dict[str, int] = field(default_factory=dict)  # agent -> XLEN of its DLQ
    orphan_groups: list[GroupSnapshot] = field(default_factory=list)
    _recorded: dict[str, str] | None = None
    _orphans_at: float | None = None

    async def ping_loop(
        self,
        url: str,
        interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        options: dict[str, Any] | None = None,
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
            **(options or {}),  # the connection mode (sentinel: re-resolves the master)
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
        runtimes = list(agents)
        try:
            with anyio.fail_after(time_limit):
                if delivery is not None:
                    for runtime in runtimes:
                        groups.extend(await delivery.group_stats(runtime))
                dlq_lengths = await _dlq_lengths(redis, runtimes)
                if delivery is not None:
                    await self._bookkeep_groups(redis, delivery, runtimes)
        except Exception as exc:
            log.debug("group stats failed", error=_describe(exc))
            return
        self.groups = groups
        self.dlq_lengths = dlq_lengths

    async def _bookkeep_groups(
        self, redis: AsyncRedis, delivery: DeliveryHooks, runtimes: list[AgentRuntime]
    ) -> None:
        """Record the plan's groups when they changed; look for orphans now and then."""
        rebalancer = delivery.rebalancer
        plan = {rt.config.group: rt.name for rt in runtimes}
        if plan != self._recorded:
            await record_groups(redis, rebalancer.keys, rebalancer.supervisor_name, plan)
            self._recorded = plan
            self._orphans_at = None  # a reload may have just orphaned a group: look now
        now = anyio.current_time()
        if self._orphans_at is not None and now - self._orphans_at < ORPHAN_SCAN_INTERVAL:
            return
        found, _recorded = await namespace_groups(redis, rebalancer.keys)
        self._orphans_at = now
        self.orphan_groups = [
            GroupSnapshot(
                stream=g.stream,
                group=g.info.name,
                pending=g.info.pending,
                lag=g.info.lag,
                consumers=g.info.consumers,
                lag_note=g.info.lag_note,
            )
            for g in orphans(found)
        ]


async def _dlq_lengths(redis: AsyncRedis, runtimes: list[AgentRuntime]) -> dict[str, int]:
    """XLEN of every agent's dead-letter stream (what is in it now, whoever wrote it)."""
    if not runtimes:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for runtime in runtimes:
            pipe.xlen(runtime.config.dlq_stream)
        replies = await pipe.execute()
    return {rt.name: int(n) for rt, n in zip(runtimes, replies, strict=True)}
