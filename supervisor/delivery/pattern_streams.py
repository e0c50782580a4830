"""The streams an agent's stream patterns cover right now, for reclaim, sweep and status.

Workers follow patterns on their own (:mod:`core_bus.following`); the
supervisor resolves the same patterns whenever it acts on the group: a SCAN
``TYPE stream`` per pattern (what the workers' finder runs), then one pipelined
XINFO GROUPS, keeping the matches on which the agent's group exists (a stream
no worker has joined yet holds nothing of the group to reclaim). Crash
reclaim, the idle sweep, dead-lettering of poison and the group metrics thus
cover every matched stream, including ones created after start.

Per-stream series are capped: an agent whose pattern matches thousands of
streams would otherwise put thousands of label sets into ``/metrics`` and
``/status``. The :data:`STREAM_SERIES_CAP` streams with the most pending
entries are reported one by one, the rest as one ``stream="(other)"`` row per
group (pending and lag summed, consumers the largest); how many streams each
pattern matched is reported separately (``ag1_agent_pattern_streams``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.streams.finder import StreamFinder
from core_bus.streams.patterns import glob_match, is_pattern
from supervisor.config.models import AgentConfig
from supervisor.delivery.consumers import GroupStats, group_stats

#: Streams of one agent reported one by one in /metrics and /status; the rest are summed.
STREAM_SERIES_CAP = 50
OTHER_STREAMS = "(other)"

log = get_logger("supervisor.delivery")


async def _ignore(_streams: list[str]) -> None:
    return None


class PatternStreams:
    """Resolves agents' stream patterns against Redis; remembers the last counts per pattern."""

    def __init__(self, redis: AsyncRedis, keys: StreamKeyBuilder) -> None:
        self.redis = redis
        self.keys = keys
        self._matched: dict[str, dict[str, int]] = {}

    async def resolve(self, agent: AgentConfig) -> tuple[tuple[str, ...], list[GroupStats]]:
        """``(streams to act on, their group stats)``; plain agents cost nothing here."""
        if not agent.stream_patterns:
            return tuple(agent.read_streams), []
        finder = StreamFinder(
            self.redis,
            agent.stream_patterns,
            _ignore,
            poll_delay=float(agent.discovery_interval),
            keys=self.keys,
            log=log,
        )
        found = await finder.scan()
        plain = [s for s in agent.streams if not is_pattern(s)]
        stats = await group_stats(self.redis, list(dict.fromkeys([*plain, *found])), agent.group)
        joined = {s.stream for s in stats}
        self._matched[agent.name] = {
            p: sum(1 for s in found if s in joined and glob_match(p, s))
            for p in agent.stream_patterns
        }
        streams = [*plain, *sorted(s for s in found if s in joined and s not in plain)]
        return tuple(streams), stats

    def matched(self, agent: str) -> dict[str, int]:
        """Pattern -> streams it matched (with the group) at the last resolve."""
        return dict(self._matched.get(agent, {}))


def capped(stats: Sequence[Any], make: Any, group: str, cap: int | None = None) -> list[Any]:
    """At most ``cap`` rows of ``stats`` (most pending first) plus one summed ``(other)`` row.

    ``make(stream=..., group=..., pending=..., lag=..., consumers=...)`` builds the
    summary row; lag is summed over the streams where it is known, or None.
    """
    cap = STREAM_SERIES_CAP if cap is None else cap
    if len(stats) <= cap:
        return list(stats)
    ranked = sorted(stats, key=lambda s: (-(s.pending or 0), s.stream))
    shown, rest = ranked[:cap], ranked[cap:]
    lags = [s.lag for s in rest]
    summary = make(
        stream=OTHER_STREAMS,
        group=group,
        pending=sum(s.pending or 0 for s in rest),
        lag=None if any(lag is None for lag in lags) else sum(lags),
        consumers=max((s.consumers or 0) for s in rest),
    )
    return [*sorted(shown, key=lambda s: s.stream), summary]
