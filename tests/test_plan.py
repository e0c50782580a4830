"""The plan: workers per agent, start/stop order by ``after``, and reload diffs."""

from __future__ import annotations

from pathlib import Path

from supervisor.config.load import load_config
from supervisor.config.models import FleetConfig
from supervisor.config.plan import build_plan


def load(tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> FleetConfig:
    path = tmp_path / "fleet.toml"
    path.write_text(body)
    return load_config(path, environ=environ or {}, check_imports=False)


def agent(name: str, extra: str = "") -> str:
    return f'[[agents]]\nname = "{name}"\ncommand = ["sh"]\n{extra}\n'


def test_plan_lists_agents_in_file_order_with_workers(tmp_path: Path) -> None:
    """Each agent's plan carries its group, read streams, kind and worker names."""
    config = load(tmp_path, agent("b", "replicas = 2\nshards = 2") + agent("a", "replicas = 0"))
    plan = build_plan(config)
    assert list(plan.agents) == ["b", "a"]
    b = plan.agents["b"]
    assert b.group == "b"
    assert b.kind == "command"
    assert b.read_streams == ["AG1:agent:b:inbox:shard:0", "AG1:agent:b:inbox:shard:1"]
    assert b.worker_names == ["b/0", "b/1"]
    assert plan.agents["a"].worker_names == []
    assert plan.worker_count == 2
    assert b.config is config.agent("b")


def test_start_order_layers_follow_after(tmp_path: Path) -> None:
    """Agents start in layers; an agent waits for every agent it names in ``after``."""
    body = (
        agent("web", 'after = ["api", "cache"]')
        + agent("api", 'after = ["db"]')
        + agent("db")
        + agent("cache")
        + agent("batch")
    )
    plan = build_plan(load(tmp_path, body))
    assert plan.start_order() == [["db", "cache", "batch"], ["api"], ["web"]]
    assert plan.stop_order() == [["web"], ["api"], ["db", "cache", "batch"]]


def test_diff_classifies_every_agent(tmp_path: Path) -> None:
    """Reload diff: added, removed, changed (fingerprint), scaled (replicas only), unchanged."""
    old = build_plan(
        load(
            tmp_path,
            agent("keep") + agent("scale", "replicas = 1") + agent("edit") + agent("gone"),
        )
    )
    new = build_plan(
        load(
            tmp_path,
            agent("keep")
            + agent("scale", "replicas = 4")
            + agent("edit", 'stop_timeout = "3s"')
            + agent("fresh"),
        )
    )
    diff = old.diff(new)
    assert diff.added == ["fresh"]
    assert diff.removed == ["gone"]
    assert diff.changed == ["edit"]
    assert diff.scaled == ["scale"]
    assert diff.unchanged == ["keep"]
    assert not diff.empty
    assert old.diff(old).empty


def test_changed_wins_over_scaled(tmp_path: Path) -> None:
    """An agent whose replicas and settings both change is 'changed', not 'scaled'."""
    old = build_plan(load(tmp_path, agent("a", "replicas = 1")))
    new = build_plan(load(tmp_path, agent("a", "replicas = 3\nconcurrency = 2")))
    diff = old.diff(new)
    assert diff.changed == ["a"] and diff.scaled == []


def test_fingerprint_ignores_replicas_but_sees_fleet_settings(tmp_path: Path) -> None:
    """Workers must restart when Redis, its password, namespace or supervisor name change."""
    base = build_plan(load(tmp_path, agent("a")))
    fp = base.agents["a"].fingerprint
    assert build_plan(load(tmp_path, agent("a", "replicas = 7"))).agents["a"].fingerprint == fp
    assert build_plan(load(tmp_path, agent("a"))).agents["a"].fingerprint == fp  # stable
    variants = [
        ({"AG1_REDIS__URL": "redis://other:6380/0"}, ""),
        ({"AG1_REDIS__PASSWORD": "x"}, ""),
        ({"AG1_REDIS__NAMESPACE": "Q"}, ""),
        ({"AG1_SUPERVISOR__NAME": "elsewhere"}, ""),
        ({}, 'env = { A = "1" }'),
    ]
    for environ, extra in variants:
        changed = build_plan(load(tmp_path, agent("a", extra), environ)).agents["a"]
        assert changed.fingerprint != fp, (environ, extra)
