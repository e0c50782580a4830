"""What the daemon does with the rebalancer when workers come and go.

Crash reclaim the moment a worker exits (or, with no live sibling, an orphan
list served to the first worker that becomes ready), stale-consumer cleanup
once per agent, the periodic sweep, and the SIGUSR1 nudge that makes a
receiver look at its own pending list at once. The Redis work itself is
:class:`supervisor.delivery.rebalance.Rebalancer`'s.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import anyio

from core_bus.log import get_logger
from supervisor.delivery.group_target import REASON_CRASH
from supervisor.delivery.pattern_streams import PatternStreams, capped
from supervisor.delivery.rebalance import GroupTarget, Rebalancer
from supervisor.fleet.snapshot import GroupSnapshot, group_snapshot
from supervisor.runtime.table import AgentRuntime, WorkerTable

log = get_logger("supervisor.delivery")

#: Upper bounds of one rebalancer call; a stuck Redis never wedges the daemon.
RECLAIM_DEADLINE = 30.0
CLEANUP_DEADLINE = 60.0
SWEEP_DEADLINE = 30.0
RECORD_DEADLINE = 5.0


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class DeliveryHooks:
    """The daemon's side of crash-aware reclaim, cleanup and sweeping."""

    def __init__(self, rebalancer: Rebalancer, table: WorkerTable) -> None:
        self.rebalancer = rebalancer
        self._table = table
        # why each consumer waiting in an orphan list left (crash or a clean exit),
        # so its reclaim, when a worker gets ready, is logged and counted truthfully
        self._orphan_reasons: dict[str, str] = {}
        self.patterns = PatternStreams(rebalancer.redis, rebalancer.keys)
        #: dead consumer -> its exit reason, until its entries are reclaimed (orphans wait)
        self._exit_reasons: dict[str, str] = {}

    async def record_consumer(self, runtime: AgentRuntime, consumer: str) -> None:
        """Remember a consumer name handed to a worker of a bus agent (see the registry)."""
        if not runtime.config.uses_bus:
            return
        try:
            with anyio.fail_after(RECORD_DEADLINE):
                await self.rebalancer.registry.record(consumer, runtime.name)
        except Exception as exc:  # the sweep still covers it; cleanup after a crash may not
            log.warning(
                "consumer not recorded", agent=runtime.name, consumer=consumer, error=_error(exc)
            )

    @staticmethod
    def base_target(runtime: AgentRuntime) -> GroupTarget:
        """The agent's group as configured (patterns not resolved)."""
        agent = runtime.config
        return GroupTarget(
            agent=agent.name,
            group=agent.group,
            streams=tuple(agent.read_streams),
            max_deliveries=agent.max_deliveries,
            claim_idle=agent.claim_idle,
            dlq_stream=agent.dlq_stream,
            # Ordered agents: reclaim evicts the dead worker's shard leases at
            # once (not after the lease TTL) and the sweep leaves them alone.
            ordered=bool(agent.ordered),
            base_streams=tuple(agent.streams),
            shards=int(agent.shards),
            suspects_key=agent.keys.suspects(agent.group),
            dead_letter_maxlen=agent.dead_letter_maxlen,
        )

    async def target(self, runtime: AgentRuntime, *, pending_only: bool = False) -> GroupTarget:
        """The group with every stream it covers now (pattern matches resolved).

        ``pending_only`` (the sweep): only matched streams where the group has
        pending entries, so an idle pattern agent over thousands of streams
        costs one pipelined XINFO GROUPS per sweep, not a round trip per stream.
        """
        base = self.base_target(runtime)
        if not runtime.config.stream_patterns:
            return base
        streams, stats = await self.patterns.resolve(runtime.config)
        if pending_only:
            busy = {s.stream for s in stats if s.pending}
            plain = set(runtime.config.streams)
            streams = tuple(s for s in streams if s in busy or s in plain)
        return replace(base, streams=streams)

    def matched(self, agent: str) -> dict[str, int]:
        """Pattern -> streams matched at the last resolve (for status and metrics)."""
        return self.patterns.matched(agent)

    def counters_for(self, agent: str) -> Any:
        return self.rebalancer.counters_for(agent)

    async def group_stats(self, runtime: AgentRuntime) -> list[GroupSnapshot]:
        """Per-stream pending/lag; pattern agents capped to ``STREAM_SERIES_CAP`` rows + one."""
        group = runtime.config.group
        if runtime.config.stream_patterns:
            _streams, stats = await self.patterns.resolve(runtime.config)
            return capped([group_snapshot(s, group) for s in stats], GroupSnapshot, group)
        stats = await self.rebalancer.group_stats(self.base_target(runtime))
        return [group_snapshot(stat, group) for stat in stats]

    @staticmethod
    def nudge(runtime: AgentRuntime, receivers: dict[str, int]) -> None:
        """SIGUSR1 to each worker that just received entries: look at your pending list now.

        Only ready workers of bus agents: a starting worker may not handle the
        signal yet (its default action kills it), nor may a command agent.
        """
        if not runtime.config.uses_bus:
            return
        for worker in runtime.ready_workers():
            if worker.consumer in receivers and receivers[worker.consumer] and worker.process:
                worker.process.signal_child(signal.SIGUSR1)

    async def reclaim(
        self,
        runtime: AgentRuntime,
        dead_consumer: str,
        reason: str | None = None,
        exit_reason: str | None = None,
    ) -> None:
        """Hand a dead consumer's pending entries to live siblings (shielded from cancellation).

        With no live sibling, or when Redis fails, the consumer waits in the
        agent's orphan list for the next worker that becomes ready. Only ready
        workers receive entries (a starting one may not handle SIGUSR1 yet).
        """
        if not runtime.config.uses_bus:
            return
        if reason is None:  # an orphan's turn came: it keeps the reason it left with
            reason = self._orphan_reasons.get(dead_consumer, REASON_CRASH)
        if exit_reason is not None:
            self._exit_reasons[dead_consumer] = exit_reason
        live = runtime.live_consumers(exclude=dead_consumer)  # ready workers only
        if not live:
            self._orphan_reasons[dead_consumer] = reason
            self._table.add_orphan(runtime, dead_consumer)
            return
        self._orphan_reasons.pop(dead_consumer, None)
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(RECLAIM_DEADLINE):
                moved = await self.rebalancer.reclaim_dead(
                    await self.target(runtime),
                    dead_consumer,
                    live,
                    reason=reason,
                    exit_reason=self._exit_reasons.get(dead_consumer, ""),
                )
        except Exception as exc:
            log.warning(
                "reclaim failed", agent=runtime.name, consumer=dead_consumer, error=_error(exc)
            )
            self._orphan_reasons[dead_consumer] = reason
            self._table.add_orphan(runtime, dead_consumer)
            return
        self._exit_reasons.pop(dead_consumer, None)
        if moved:
            log.info(
                "reclaimed pending entries",
                agent=runtime.name,
                consumer=dead_consumer,
                moved=sum(moved.values()),
                receivers=len(moved),
            )
            self.nudge(runtime, moved)

    async def cleanup_stale(self, runtime: AgentRuntime, running: set[str]) -> None:
        """Reclaim and delete consumers a previous run of this supervisor left behind."""
        if not runtime.config.uses_bus:
            return
        live = set(runtime.live_consumers()) | running
        receivers = runtime.live_consumers()  # ready workers only
        try:
            with anyio.fail_after(CLEANUP_DEADLINE):
                moved = await self.rebalancer.cleanup_stale(
                    await self.target(runtime), sorted(live), receivers=receivers
                )
        except Exception as exc:
            log.warning("stale consumer cleanup failed", agent=runtime.name, error=_error(exc))
            self._table.stale_cleanup_failed(runtime)  # try again with the next ready worker
            return
        if moved:
            self.nudge(runtime, moved)

    async def sweep_loop(self, base_interval: Callable[[], float]) -> None:
        """Sweep forever, each agent at its own ``sweep_interval`` (default ``base_interval()``)."""
        while True:
            base = base_interval()
            await anyio.sleep(self.sweep_period(self._table.runtimes(), base))
            await self.sweep_due(self._table.runtimes(), anyio.current_time(), base)

    @staticmethod
    def sweep_period(agents: Iterable[AgentRuntime], base: float) -> float:
        """Wake as often as the most eager agent wants; each agent keeps its own pace."""
        own = [float(rt.config.sweep_interval) for rt in agents if rt.config.sweep_interval]
        return min([base, *own])

    async def sweep_due(self, agents: Iterable[AgentRuntime], now: float, base: float) -> None:
        """One pass: XAUTOCLAIM for every agent whose sweep_interval has elapsed."""
        for runtime in list(agents):
            if not runtime.config.uses_bus:
                continue
            interval = runtime.config.sweep_interval or base
            if now - runtime.last_sweep < interval:
                continue
            live = runtime.live_consumers()
            if not live:
                continue
            self._table.swept(runtime, now)
            try:
                with anyio.fail_after(SWEEP_DEADLINE):
                    moved = await self.rebalancer.sweep(
                        await self.target(runtime, pending_only=True), live
                    )
            except Exception as exc:
                log.warning("sweep failed", agent=runtime.name, error=_error(exc))
                continue
            if moved:
                self.nudge(runtime, moved)
