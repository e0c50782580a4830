"""Leases on held entries: the idle sweep never takes an entry a live worker holds.

Every ``claim_idle / 3`` the subscription re-claims every entry it holds
(queued, running, waiting for a retry) to itself with XCLAIM ``JUSTID``: the
entry's idle time restarts, its delivery counter does not move. The claim is
fenced in a Lua script (per stream, one call per batch of ids): an entry that
is no longer pending for this consumer is left alone and reported lost, so a
worker resumed after SIGSTOP neither steals back what the sweep gave a
sibling nor runs it a second time. A *stalled* worker (every handler slot
busy for longer than ``claim_idle``) first lets go of its queued entries, so
they go idle and the sweep hands them to a sibling instead of leaving them
behind hung handlers.

:meth:`LeaseKeeper.stale` tells the runner when the last successful renewal
is older than ``claim_idle`` (the process was paused, or Redis away), when the
process stood still for longer than a shorter ``fence`` (the supervisor's
membership fence: a host paused that long may have been declared dead and
reclaimed; measured by a local ticker, no Redis traffic), and after every lost
connection (:meth:`LeaseKeeper.invalidate`): then ownership is re-checked
before any handler starts or any ack is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.streams.connwatch import ConnectionWatch
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.replies import text

#: Ids per script call.
LEASE_BATCH = 500
#: How often a worker looks whether its supervisor's membership lease is back.
MEMBER_POLL = 0.05

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids. Returns the ids still ours.
_RENEW = """
local kept = {}
for i = 3, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if row[1] and row[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""


class LeaseKeeper:
    """Renews the leases of what one subscription holds; drops what it lost."""

    def __init__(
        self,
        redis: AsyncRedis,
        group: str,
        consumer: str,
        claim_idle: float,
        *,
        held_ids: Callable[[], Iterable[tuple[str, list[str]]]],
        lost: Callable[[str, list[str]], None],
        before_renew: Callable[[], None] | None = None,
        watch: ConnectionWatch,
        log: Any,
        fence: float = 0.0,
        member_key: str = "",
    ) -> None:
        self._r = redis
        self._group = group
        self._consumer = consumer
        self.claim_idle = claim_idle
        # A pause longer than ``fence`` (a supervisor's membership fence: a host paused
        # that long may have been declared dead and reclaimed) is noticed by the local
        # clock alone: ``ticked_at`` moves every fence/3 while the loop runs, so a gap
        # means the process (or its loop) stood still; no Redis call is spent on it.
        self.fence = fence if claim_idle > 0 else 0.0
        self.ticked_at = time.perf_counter()
        # The supervisor's membership lease (empty: none). After a pause or a lost
        # connection, ownership is re-checked only once that key exists again: while it
        # is gone, live peers may still be reclaiming what we hold, and a check made
        # before their claim would keep entries they are about to take.
        self.member_key = member_key
        self._member_unsure = False
        self._held_ids = held_ids
        self._lost = lost
        self._before_renew = before_renew
        self._watch = watch
        self._log = log
        self._script = redis.register_script(_RENEW)
        self.renewed_at = time.perf_counter()

    @property
    def enabled(self) -> bool:
        return self.claim_idle > 0

    def invalidate(self) -> None:
        """Redis was lost (or the worker paused): re-check everything held before
        the next handler starts or the next ack goes out."""
        if self.enabled:
            self.renewed_at = float("-inf")
            self._member_unsure = bool(self.member_key)

    def stale(self, now: float) -> bool:
        """True when the last renewal is older than ``claim_idle`` (sweeps may have run),
        or the process stood still for longer than ``fence`` (a reclaim may have run)."""
        if not self.enabled:
            return False
        return now - self.renewed_at > self.claim_idle or bool(
            self.fence and now - self.ticked_at > self.fence
        )

    async def _wait_for_member(self) -> None:
        """Until our supervisor holds its membership lease again (it rejoins within
        moments of reaching Redis; a supervisor that died takes us with it)."""
        waited = False
        while not await self._r.exists(self.member_key):
            if not waited:
                waited = True
                self._log.warning("waiting_for_supervisor_lease", key=self.member_key)
            await anyio.sleep(MEMBER_POLL)
        if waited:
            self._log.info("supervisor_lease_back")

    async def watch_pauses(self) -> None:
        """Tick every ``fence / 3``; a tick that comes later than ``fence`` means we were
        paused (SIGSTOP, a stalled loop): invalidate, so what we hold is re-checked."""
        if not self.fence:
            return
        while True:
            await anyio.sleep(self.fence / 3)
            now = time.perf_counter()
            if now - self.ticked_at > self.fence:
                self.invalidate()
                self._member_unsure = bool(self.member_key)
            self.ticked_at = now

    async def run(self) -> None:
        """Renew every ``claim_idle / 3`` seconds."""
        if not self.enabled:
            return
        interval = self.claim_idle / 3
        while True:
            await anyio.sleep(max(0.01, interval - (time.perf_counter() - self.renewed_at)))
            try:
                await self.renew()
            except TRANSIENT_ERRORS as exc:
                self._watch.lost(exc, "lease")
                await anyio.sleep(min(interval, 1.0))

    async def renew(self) -> int:
        """Renew every held entry now; drop the lost ones; returns how many were lost."""
        if self._member_unsure:
            await self._wait_for_member()
        started = time.perf_counter()
        lost = 0
        if self._before_renew is not None:
            self._before_renew()
        for stream, ids in self._held_ids():
            for start in range(0, len(ids), LEASE_BATCH):
                chunk = ids[start : start + LEASE_BATCH]
                kept_raw = await self._script(
                    keys=[stream], args=[self._group, self._consumer, *chunk]
                )
                kept = {text(i) for i in kept_raw or ()}
                gone = [i for i in chunk if i not in kept]
                if gone:
                    lost += len(gone)
                    self._lost(stream, gone)
        self.renewed_at = started
        self.ticked_at = max(self.ticked_at, started)
        self._member_unsure = False
        if lost:
            self._log.warning("entries_lost_to_sweep", entries=lost)
        return lost
