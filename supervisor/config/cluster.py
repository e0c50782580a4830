"""What Redis Cluster costs a configuration: warnings for ``ag1-fleet check``.

In cluster mode an agent's own keys share one hash slot (``{agent}`` tags), so
dead-letter + ack is one MULTI/EXEC. A stream the user named without that tag
lives in another slot: its dead letters take the split path (XADD through a
deduplicating script, then XACK: one more round trip, and a "seen" entry kept
for a day), and a worker reading streams of several slots blocks one
connection per slot. Both work; the warning says so once per agent.
"""

from __future__ import annotations

from redis.crc import key_slot

from core_bus.streams.patterns import is_pattern
from supervisor.config.errors import Loc
from supervisor.config.models import AgentConfig

Problem = tuple[Loc, str]


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


def cluster_warnings(agents: dict[int, AgentConfig]) -> list[Problem]:
    """One warning per agent whose streams are outside its dead-letter stream's slot."""
    warnings: list[Problem] = []
    for index, agent in sorted(agents.items()):
        if not agent.keys.cluster:
            continue
        dlq_slot = _slot(agent.dlq_stream)
        plain = [s for s in agent.streams if not is_pattern(s)]
        apart = [s for s in plain if _slot(s) != dlq_slot]
        patterns = agent.stream_patterns
        if not apart and not patterns:
            continue
        named = ", ".join(repr(s) for s in (apart + patterns)[:3])
        more = len(apart) + len(patterns) - 3
        slots = len({_slot(s) for s in agent.read_streams if not is_pattern(s)})
        message = (
            f"Redis Cluster: {named}{f' and {more} more' if more > 0 else ''} "
            f"not in the slot of {agent.dlq_stream!r}: dead-lettering those entries is "
            "not one MULTI but XADD then XACK (one more round trip, deduplicated by source "
            "stream and id)"
        )
        if slots > 1:
            message += f"; each worker blocks one connection per slot ({slots} slots)"
        message += f"; a tagged name shares the slot, e.g. {agent.keys.agent_inbox(agent.group)!r}"
        warnings.append((("agents", index, "streams"), message))
    return warnings
