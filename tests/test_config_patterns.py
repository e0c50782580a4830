"""Stream patterns in fleet.toml, checked by `ag1-fleet check`: patterns that can never match
a key of the namespace and sharded patterns are rejected (exit 2, one line naming the file
and the field), overlapping patterns of two agents in one group are warned about."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core_bus.keys import StreamKeyBuilder
from core_bus.streams.patterns import can_match_prefix, globs_overlap, pattern_problem
from tests.test_config_cli import run_check

pytestmark = pytest.mark.timeout(60)

HANDLER = "async def handle(env):\n    return None\n"


def _check(python_exe: str, tmp_path: Path, agents: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "h.py").write_text(HANDLER)
    config = tmp_path / "fleet.toml"
    config.write_text(agents)
    return run_check(python_exe, "-c", str(config))


def test_pattern_outside_the_namespace_rejected(tmp_path: Path, python_exe: str) -> None:
    result = _check(
        python_exe,
        tmp_path,
        '[[agents]]\nname = "a"\nhandler = "h:handle"\nstreams = ["other:agent:*:inbox"]\n',
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'fleet.toml'}: agents[0].streams: stream pattern 'other:agent:*:inbox' "
        "can never match a key of namespace 'AG1' (every key starts with 'AG1:')"
    ]


def test_pattern_checked_against_the_configured_namespace(tmp_path: Path, python_exe: str) -> None:
    """With [redis] namespace = "TEAM", "AG1:*" can never match; "TEAM:*" is fine."""
    body = '[redis]\nnamespace = "TEAM"\n[[agents]]\nname = "a"\nhandler = "h:handle"\n'
    bad = _check(python_exe, tmp_path, body + 'streams = ["AG1:agent:*:inbox"]\n')
    assert bad.returncode == 2 and "namespace 'TEAM'" in bad.stderr, bad.stderr
    good = _check(python_exe, tmp_path, body + 'streams = ["TEAM:agent:*:inbox"]\n')
    assert good.returncode == 0, good.stderr
    assert "TEAM:agent:*:inbox" in good.stdout


def test_sharded_or_ordered_pattern_rejected_with_the_reason(
    tmp_path: Path, python_exe: str
) -> None:
    result = _check(
        python_exe,
        tmp_path,
        '[[agents]]\nname = "a"\nhandler = "h:handle"\nstreams = ["AG1:agent:*:inbox"]\n'
        "shards = 4\nordered = true\n",
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{tmp_path / 'fleet.toml'}: agents[0]: stream pattern ")
    assert "cannot be sharded" in line and "list plain stream names" in line


def test_dead_letter_pattern_rejected(tmp_path: Path, python_exe: str) -> None:
    result = _check(
        python_exe,
        tmp_path,
        '[[agents]]\nname = "a"\nhandler = "h:handle"\nstreams = ["AG1:dlq:*"]\n',
    )
    assert result.returncode == 2 and "only matches dead-letter streams" in result.stderr


def test_overlapping_patterns_in_one_group_warned(tmp_path: Path, python_exe: str) -> None:
    agents = (
        '[[agents]]\nname = "a"\nhandler = "h:handle"\ngroup = "shared"\n'
        'streams = ["AG1:agent:*:inbox"]\n'
        '[[agents]]\nname = "b"\nhandler = "h:handle"\ngroup = "shared"\n'
        'streams = ["AG1:agent:b*"]\n'
        '[[agents]]\nname = "c"\nhandler = "h:handle"\ngroup = "other"\n'
        'streams = ["AG1:agent:*:inbox"]\n'
    )
    result = _check(python_exe, tmp_path, agents)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: {tmp_path / 'fleet.toml'}: agents[1].streams: 'AG1:agent:b*' overlaps "
        "'AG1:agent:*:inbox' of agent 'a' (agents[0]) in group 'shared': the two agents "
        "would split the entries of every stream both match"
    ]


def test_disjoint_patterns_not_warned(tmp_path: Path, python_exe: str) -> None:
    agents = (
        '[[agents]]\nname = "a"\nhandler = "h:handle"\ngroup = "shared"\n'
        'streams = ["AG1:agent:*:inbox"]\n'
        '[[agents]]\nname = "b"\nhandler = "h:handle"\ngroup = "shared"\n'
        'streams = ["AG1:flow:*:input"]\n'
    )
    result = _check(python_exe, tmp_path, agents)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("AG1:agent:*:inbox", "AG1:*", True),
        ("AG1:agent:*:inbox", "AG1:flow:*", False),
        ("AG1:agent:*:inbox", "AG1:agent:x:inbox", True),
        ("AG1:agent:*:inbox", "AG1:agent:x:outbox", False),
        ("AG1:agent:[ab]*", "AG1:agent:b?", True),
        ("AG1:agent:[ab]*", "AG1:agent:c*", False),
        ("AG1:agent:[^a]", "AG1:agent:a", False),
        ("AG1:*:inbox", "*:agent:*", True),
        ("AG1:a\\*", "AG1:ab", False),
    ],
)
def test_globs_overlap(a: str, b: str, overlap: bool) -> None:
    assert globs_overlap(a, b) is overlap
    assert globs_overlap(b, a) is overlap


def test_namespace_reachability() -> None:
    keys = StreamKeyBuilder("AG1")
    assert can_match_prefix("*:inbox", "AG1:")
    assert can_match_prefix("A?1:*", "AG1:")
    assert not can_match_prefix("AG1", "AG1:")
    assert pattern_problem("AG1:user:*:inbox", keys) is None
    assert pattern_problem("AG2:*", keys) is not None
