"""The fleet as one JSON document (``GET /v1/fleet``), read from Redis by any host.

Every live member with its agents, workers, readiness and heartbeat age (the
lease's ``lease_ttl_ms - PTTL``: Redis's clock, never a host's), members whose
lease is gone but who still hold entries nobody could take, the recently
departed with what was reclaimed from them and what is still pending, and the
recent fleet commands with their acks. Ages are relative to Redis ``TIME``.
"""

from __future__ import annotations

from typing import Any

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.clock import redis_time_ms as redis_ms
from supervisor.fleetctl.commands import recent
from supervisor.membership.directory import departed, members


def pending_notes(pending_left: dict[str, int], running: set[str]) -> list[str]:
    """Why entries are still pending: no live supervisor runs their agent."""
    return [
        f"{n} entries of {agent} wait: no live supervisor runs agent {agent}"
        if agent not in running
        else f"{n} entries of {agent} wait for a live supervisor to claim them"
        for agent, n in sorted(pending_left.items())
        if n > 0
    ]


async def fleet_view(
    redis: Any, keys: StreamKeyBuilder, *, asked: str, departed_count: int = 20
) -> dict[str, Any]:
    """The document ``GET /v1/fleet`` answers (``asked``: the supervisor answering)."""
    now_ms = await redis_ms(redis)
    everyone = await members(redis, keys)
    live = [m for m in everyone if m.alive]
    running = {agent for m in live for agent in m.agents}
    gone = [m for m in everyone if not m.alive]
    left = await departed(redis, keys, count=departed_count)
    return {
        "asked": asked,
        "redis_time_ms": now_ms,
        "members": [m.as_json() for m in live],
        "unreclaimed": [
            {**m.as_json(), "notes": pending_notes(m.pending_left, running)} for m in gone
        ],
        "departed": [
            {
                **d.as_json(),
                "age_ms": max(0, now_ms - d.at_ms) if d.at_ms else None,
                "notes": pending_notes(d.pending_left, running),
            }
            for d in left
        ],
        "commands": await recent(redis, keys, count=10),
    }
