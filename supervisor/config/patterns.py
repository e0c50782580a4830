"""Checks of stream glob patterns in ``[[agents]].streams``.

A pattern is followed at run time (every worker reads every matching stream in
the agent's group), so mistakes show only as silence: a pattern outside the
namespace never matches a key the fleet writes, one under the dead-letter
prefix only matches streams discovery never reads, and two agents whose
patterns overlap in one group would split the entries of the common streams.
The first two are errors (:func:`core_bus.streams.patterns.pattern_problem`, run by
the model), the last a warning (it may be meant as a migration), here.
"""

from __future__ import annotations

from core_bus.streams.patterns import globs_overlap
from supervisor.config.errors import Loc
from supervisor.config.models import AgentConfig

Problem = tuple[Loc, str]


def overlap_warnings(agents: dict[int, AgentConfig]) -> list[Problem]:
    """Two agents in one group whose streams (patterns or names) can match a common stream."""
    warnings: list[Problem] = []
    ordered = sorted(agents.items())
    for pos, (index, agent) in enumerate(ordered):
        for other_index, other in ordered[:pos]:
            if other.group != agent.group or other.name == agent.name:
                continue
            if not (agent.stream_patterns or other.stream_patterns):
                continue  # plain names only: an exact clash is an error elsewhere
            pair = _overlapping(agent.streams, other.streams)
            if pair is not None:
                mine, theirs = pair
                warnings.append(
                    (
                        ("agents", index, "streams"),
                        f"{mine!r} overlaps {theirs!r} of agent {other.name!r} "
                        f"(agents[{other_index}]) in group {agent.group!r}: the two agents "
                        "would split the entries of every stream both match",
                    )
                )
    return warnings


def _overlapping(mine: list[str], theirs: list[str]) -> tuple[str, str] | None:
    for a in mine:
        for b in theirs:
            if a != b and globs_overlap(a, b):
                return a, b
    return None
