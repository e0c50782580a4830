"""The daemon's membership task: keep our lease, notice being cut off, reclaim for the dead.

Two loops in one task group (a reclaim must never delay a renewal):

- the **lease loop** renews every ``lease_ttl / 3`` on its own Redis client
  (socket timeout one interval, so a hung call cannot eat the lease). When no
  renewal succeeded for ``lease_ttl`` by the local monotonic clock (our own
  lease only: Redis runs the TTL), this supervisor is *cut off*: it logs once
  and pauses its handler workers (SIGUSR2: stop taking entries, acks only
  after an ownership re-check). When Redis answers again and the lease is
  gone, it rejoins under a new incarnation, re-records its live consumers in
  its registry (a reclaimer may have forgotten them) and resumes the workers
  (SIGUSR1: re-check ownership of everything held, then look at the pending list).
- the **watch loop** reads the directory every interval, or right when a
  member's lease is due to expire (its PTTL), and hands dead members to the
  :class:`~supervisor.membership.reclaim.CrossHostReclaimer`.

Events: ``member_joined``, ``member_cut_off``, ``member_rejoined``,
``member_left`` (here), ``member_expired`` / ``member_reclaimed`` /
``member_retired`` (reclaim).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import connect
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.repeats import ErrorStreak
from supervisor.delivery.consumers import pending_summary
from supervisor.delivery.group_target import REASON_EXIT
from supervisor.delivery.hooks import DeliveryHooks
from supervisor.membership.directory import MemberInfo, members
from supervisor.membership.lease import MemberLease
from supervisor.membership.reclaim import CrossHostReclaimer
from supervisor.runtime.table import AgentRuntime, WorkerTable

log = get_logger("supervisor.membership")

#: Wake this long after a peer's lease is due, so Redis has surely expired it.
EXPIRY_SLACK = 0.01
#: Bound on the work done at a graceful leave.
LEAVE_DEADLINE = 5.0


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def pause_workers(runtimes: list[AgentRuntime]) -> int:
    """SIGUSR2 to every ready handler worker: stop taking entries (built-in workers only:
    a command agent's default SIGUSR2 action would kill it)."""
    return _signal_handlers(runtimes, signal.SIGUSR2)


def resume_workers(runtimes: list[AgentRuntime]) -> int:
    """SIGUSR1 to every ready handler worker: re-check what you hold, then go on."""
    return _signal_handlers(runtimes, signal.SIGUSR1)


def _signal_handlers(runtimes: list[AgentRuntime], sig: int) -> int:
    sent = 0
    for runtime in runtimes:
        if not runtime.config.uses_bus or runtime.config.handler is None:
            continue
        for worker in runtime.ready_workers():
            if worker.process is not None:
                worker.process.signal_child(sig)
                sent += 1
    return sent


class Membership:
    """Joins the fleet, keeps the lease, leaves on a graceful stop, reclaims for the dead."""

    def __init__(
        self,
        *,
        name: str,
        lease_ttl: float,
        redis_url: str,
        keys: StreamKeyBuilder,
        redis_options: dict[str, Any] | None = None,
        table: WorkerTable,
        hooks: DeliveryHooks,
        http_address: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.name = name
        self.ttl = float(lease_ttl)
        self.interval = self.ttl / 3
        self._url = redis_url
        self._redis_options = dict(redis_options or {})  # mode, sentinels, ...
        self.keys = keys
        self._table = table
        self._hooks = hooks
        self._http = http_address
        self.reclaimer = CrossHostReclaimer(hooks, table, name, int(self.ttl * 1000))
        self._lease: MemberLease | None = None
        self.joined = False
        self.cut_off = False
        self.left = False
        self.last_ok = 0.0  # monotonic time the last successful renewal was sent
        self.rejoins = 0
        self.view: list[MemberInfo] = []  # the last directory read
        self._stopping = False
        self._redis_lost = False

    # -- what status and metrics show ---------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        counters = self.reclaimer.counters
        alive = [m for m in self.view if m.alive]
        return {
            "name": self.name,
            "incarnation": self._lease.incarnation if self._lease is not None else "",
            "joined": self.joined,
            "cut_off": self.cut_off,
            "lease_ttl": self.ttl,
            "rejoins": self.rejoins,
            "members": len(alive),
            "dead_members": len(self.view) - len(alive),
            "reclaimed_entries": dict(counters.entries),
            "reclaimed_consumers": dict(counters.consumers),
            "expired_seen": counters.expired_seen,
            # dead members waiting to be reclaimed, and what no live supervisor can take
            "dead": [
                {"name": m.name, "incarnation": m.incarnation, "pending_left": m.pending_left}
                for m in self.view
                if m.lease_incarnation is None
            ],
        }

    def record(self) -> dict[str, Any]:
        """This supervisor as the members hash shows it (rewritten at every renewal)."""
        agents: dict[str, Any] = {}
        for runtime in self._table.runtimes():
            active = runtime.active()
            agents[runtime.name] = {
                "workers": len(active),
                "ready": len(runtime.ready_workers()),
                "consumers": [w.consumer for w in active if w.consumer],
                "rolling": runtime.rolling,
                "group": runtime.config.group,
                "streams": list(runtime.config.read_streams),
            }
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "http": self._http(),
            "agents": agents,
        }

    # -- the task --------------------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled (the daemon calls :meth:`leave` first on a graceful stop)."""
        redis = connect(
            self._url,
            socket_timeout=self.interval,
            socket_connect_timeout=self.interval,
            **self._redis_options,
        )
        try:
            self._lease = MemberLease(redis, self.keys, self.name, int(self.ttl * 1000))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._lease_loop)
                tg.start_soon(self._watch_loop, redis)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await redis.aclose()

    async def _lease_loop(self) -> None:
        assert self._lease is not None
        unexpected = ErrorStreak(log, "membership_renew_failed", supervisor=self.name)
        while not self._stopping:
            started = time.monotonic()
            if self.joined and not self.cut_off and started - self.last_ok > self.ttl:
                self._cut_off()
            try:
                if not self.joined or self.cut_off or not await self._lease.renew(self.record()):
                    if self._stopping:
                        return  # we just left: the lease is gone on purpose
                    await self._join()
                else:
                    self.last_ok = started
                unexpected.succeeded()
                if self._redis_lost:
                    self._redis_lost = False
                    log.info("membership_redis_restored", supervisor=self.name)
            except TRANSIENT_ERRORS as exc:
                if not self._redis_lost:
                    self._redis_lost = True
                    log.warning("membership_redis_lost", supervisor=self.name, error=_error(exc))
            except Exception as exc:  # a reply we did not expect: never take the daemon down
                unexpected.failed(exc)  # once per distinct error, not every round
            elapsed = time.monotonic() - started
            await anyio.sleep(max(0.01, self.interval - elapsed))

    async def _join(self) -> None:
        assert self._lease is not None
        old = self._lease.incarnation
        sent = time.monotonic()
        previous = await self._lease.join(self.record())
        self.last_ok = sent
        if previous and previous != old:
            log.warning(
                "member_name_in_use",
                supervisor=self.name,
                previous_incarnation=previous,
                why="a run with this name held the lease within lease_ttl "
                "(a quick restart, or two supervisors share [supervisor] name)",
            )
        if not self.joined:
            self.joined = True
            log.info(
                "member_joined",
                supervisor=self.name,
                incarnation=self._lease.incarnation,
                lease_ttl=self.ttl,
            )
            return
        self.rejoins += 1
        await self._rerecord()
        was_cut_off = self.cut_off
        self.cut_off = False
        resumed = resume_workers(self._table.runtimes())
        log.warning(
            "member_rejoined",
            supervisor=self.name,
            incarnation=self._lease.incarnation,
            previous_incarnation=old,
            was_cut_off=was_cut_off,
            workers_resumed=resumed,
        )

    def _cut_off(self) -> None:
        self.cut_off = True
        paused = pause_workers(self._table.runtimes())
        log.error(
            "member_cut_off",
            supervisor=self.name,
            seconds_since_renewal=round(time.monotonic() - self.last_ok, 2),
            lease_ttl=self.ttl,
            workers_paused=paused,
        )

    async def _rerecord(self) -> None:
        """Our live consumers go back into our registry (a reclaimer may have forgotten them)."""
        registry = self._hooks.rebalancer.registry
        for runtime in self._table.runtimes():
            if not runtime.config.uses_bus:
                continue
            for worker in runtime.active():
                if worker.consumer:
                    await registry.record(worker.consumer, runtime.name)

    async def _watch_loop(self, redis: Any) -> None:
        unexpected = ErrorStreak(log, "membership_watch_failed", supervisor=self.name)
        while not self._stopping:
            wait = self.interval
            try:
                self.view = await members(redis, self.keys)
                if self.joined and not self.cut_off:
                    await self.reclaimer.scan(self.view)
                due = [
                    m.pttl_ms / 1000
                    for m in self.view
                    if m.alive and m.name != self.name and m.pttl_ms is not None
                ]
                if due:
                    wait = min(wait, min(due) + EXPIRY_SLACK)
                unexpected.succeeded()
            except TRANSIENT_ERRORS:
                pass  # the lease loop reports the state of Redis
            except Exception as exc:  # next round retries; never take the daemon down
                unexpected.failed(exc)
            await anyio.sleep(max(0.01, wait))

    # -- graceful stop ----------------------------------------------------------------
    async def leave(self) -> None:
        """After the workers drained: drop the lease at once and record the departure."""
        self._stopping = True
        if self._lease is None or not self.joined or self.left:
            return
        self.left = True
        redis = self._hooks.rebalancer.redis
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(LEAVE_DEADLINE):
                pending = await self._leftover()
                held = await self._with_client(redis).leave(pending)
        except Exception as exc:
            log.warning("member_leave_failed", supervisor=self.name, error=_error(exc))
            return
        log.info(
            "member_left",
            supervisor=self.name,
            incarnation=self._lease.incarnation,
            pending_left=pending,
            lease_held=held,
        )

    def _with_client(self, redis: Any) -> MemberLease:
        """Our lease object on ``redis`` (the leave runs on the daemon's client: the
        membership client may be closing with its task)."""
        assert self._lease is not None
        lease = MemberLease(redis, self.keys, self.name, self._lease.ttl_ms)
        lease.incarnation = self._lease.incarnation
        lease.started_ms = self._lease.started_ms
        return lease

    async def _leftover(self) -> dict[str, int]:
        """Per agent, entries still pending on our consumers; consumers holding none are
        deleted and forgotten now (nothing for anyone to reclaim)."""
        rebalancer = self._hooks.rebalancer
        out: dict[str, int] = {}
        for runtime in self._table.runtimes():
            if not runtime.config.uses_bus:
                continue
            names = await rebalancer.registry.names(runtime.name)
            if not names:
                continue
            target = await self._hooks.target(runtime)
            counts: dict[str, int] = {}
            for stream in target.streams:
                for name, n in (
                    await pending_summary(rebalancer.redis, stream, target.group)
                ).items():
                    counts[name] = counts.get(name, 0) + n
            for name in names:
                if not counts.get(name):
                    await rebalancer.reclaim_dead(target, name, [], reason=REASON_EXIT)
            left = sum(counts.get(n, 0) for n in names)
            if left:
                out[runtime.name] = left
        return out


__all__ = ["Membership", "pause_workers", "resume_workers"]
