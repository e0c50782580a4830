"""The Prometheus exposition built from snapshots: names, values, validity (promtool)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core_bus.consume.stats import HANDLER_BUCKETS, SubscriptionStats
from supervisor.fleet.snapshot import FleetSnapshot, GroupSnapshot
from supervisor.http.metrics import FleetCollector, build_registry, cumulative_buckets, render
from tests.test_http_fakes import agent, snapshot, worker

PROMTOOL = shutil.which("promtool")


def exposition(snap: FleetSnapshot, *, process_metrics: bool = False) -> str:
    registry = build_registry(lambda: snap, process_metrics=process_metrics)
    body, _ = render(registry)
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def rich_snapshot() -> FleetSnapshot:
    """Agents in several states, a worker with unknown resources, a group with unknown lag."""
    echo = agent("echo", desired=3, ready=2, state="degraded")
    echo.workers[2] = worker(
        "echo",
        2,
        "backoff",
        pid=None,
        rss_bytes=None,
        cpu_percent=None,
        uptime_seconds=None,
        last_heartbeat_age_seconds=None,
    )
    odd = agent("odd", desired=1, state="running")
    odd.workers[0].state = "draining"  # a state this module does not know yet
    snap = snapshot(echo, odd)
    snap.groups = [
        GroupSnapshot(
            stream="AG1:agent:echo:inbox", group="echo-group", pending=7, lag=None, consumers=3
        ),
        GroupSnapshot(
            stream="AG1:agent:odd:inbox", group="odd-group", pending=0, lag=12, consumers=1
        ),
    ]
    return snap


def test_cumulative_buckets_from_non_cumulative_counts() -> None:
    """Per-bucket counts become cumulative 'le' buckets ending with +Inf == total count."""
    stats = SubscriptionStats()
    for seconds in (0.0005, 0.003, 0.003, 0.2, 7.0, 100.0):
        stats.observe_handler(seconds)
    buckets = dict(cumulative_buckets(stats))
    assert buckets["0.001"] == 1
    assert buckets["0.005"] == 3
    assert buckets["0.25"] == 4
    assert buckets["10.0"] == 5
    assert buckets["60.0"] == 5
    assert buckets["+Inf"] == 6
    assert len(buckets) == len(HANDLER_BUCKETS) + 1
    values = [v for _, v in cumulative_buckets(stats)]
    assert values == sorted(values)


def test_malformed_bucket_report_keeps_exposition_valid() -> None:
    """A bucket list of the wrong length yields zero buckets rather than a broken histogram."""
    stats = SubscriptionStats()
    stats.handler_buckets = [1, 2]
    assert all(v == 0 for _, v in cumulative_buckets(stats))


def test_families_and_values() -> None:
    """Every documented family is present with the snapshot's values and ag1_ names."""
    text = exposition(rich_snapshot())
    got = samples(text)
    echo = (("agent", "echo"),)
    assert got[("ag1_redis_up", ())] == 1
    assert got[("ag1_supervisor_plan_ready", ())] == 1
    assert got[("ag1_supervisor_uptime_seconds", ())] == 100
    assert (
        got[
            (
                "ag1_supervisor_info",
                (("config_hash", "abc123"), ("supervisor", "test-host"), ("version", "0.1.0")),
            )
        ]
        == 1
    )
    assert got[("ag1_agent_desired_replicas", echo)] == 3
    assert got[("ag1_agent_ready_replicas", echo)] == 2
    assert got[("ag1_agent_state", (("agent", "echo"), ("state", "degraded")))] == 1
    assert got[("ag1_agent_state", (("agent", "echo"), ("state", "running")))] == 0
    assert got[("ag1_agent_restarts_total", echo)] == 2
    assert got[("ag1_worker_exits_total", (("agent", "echo"), ("reason", "exit 1")))] == 1
    assert got[("ag1_messages_processed_total", echo)] == 120
    assert got[("ag1_messages_failed_total", echo)] == 3
    assert got[("ag1_messages_dead_lettered_total", echo)] == 1
    assert got[("ag1_messages_reclaimed_total", (("agent", "echo"), ("reason", "crash")))] == 4
    assert got[("ag1_deleted_consumers_total", echo)] == 1
    assert got[("ag1_handler_duration_seconds_count", echo)] == 6
    assert got[("ag1_handler_duration_seconds_bucket", (("agent", "echo"), ("le", "+Inf")))] == 6
    assert got[("ag1_handler_duration_seconds_sum", echo)] == pytest.approx(107.2065)
    w2 = (("agent", "echo"), ("state", "backoff"), ("worker", "echo/2"))
    assert got[("ag1_worker_state", w2)] == 1
    w2 = (("agent", "echo"), ("state", "ready"), ("worker", "echo/2"))
    assert got[("ag1_worker_state", w2)] == 0
    w0 = (("agent", "echo"), ("worker", "echo/0"))
    assert got[("ag1_worker_rss_bytes", w0)] == 50_000_000
    assert got[("ag1_worker_cpu_percent", w0)] == 1.5
    assert (
        got[("ag1_group_pending", (("group", "echo-group"), ("stream", "AG1:agent:echo:inbox")))]
        == 7
    )
    assert got[("ag1_group_lag", (("group", "odd-group"), ("stream", "AG1:agent:odd:inbox")))] == 12
    names = {name for name, _ in got}
    assert all(name.startswith("ag1_") for name in names)


def test_unknown_values_are_omitted_not_zero() -> None:
    """Unknown lag, RSS, CPU, uptime are left out instead of being reported as 0."""
    got = samples(exposition(rich_snapshot()))
    assert (
        "ag1_group_lag",
        (("group", "echo-group"), ("stream", "AG1:agent:echo:inbox")),
    ) not in got
    w2 = (("agent", "echo"), ("worker", "echo/2"))
    for name in (
        "ag1_worker_rss_bytes",
        "ag1_worker_cpu_percent",
        "ag1_worker_uptime_seconds",
        "ag1_worker_heartbeat_age_seconds",
    ):
        assert (name, w2) not in got


def test_unknown_state_gets_its_own_sample() -> None:
    """A state the collector does not know is still exported (1) next to the known ones (0)."""
    got = samples(exposition(rich_snapshot()))
    draining = (("agent", "odd"), ("state", "draining"), ("worker", "odd/0"))
    ready = (("agent", "odd"), ("state", "ready"), ("worker", "odd/0"))
    assert got[("ag1_worker_state", draining)] == 1
    assert got[("ag1_worker_state", ready)] == 0


def test_snapshot_taken_at_scrape_time() -> None:
    """Each scrape asks for a fresh snapshot; registering does not take one."""
    calls = []

    def source() -> FleetSnapshot:
        calls.append(1)
        snap = snapshot()
        snap.agents[0].messages.processed = 100 * len(calls)
        return snap

    registry = build_registry(source, process_metrics=False)
    assert calls == []
    first = samples(render(registry)[0].decode())
    second = samples(render(registry)[0].decode())
    key = ("ag1_messages_processed_total", (("agent", "echo"),))
    assert (first[key], second[key]) == (100, 200)
    assert list(FleetCollector(source).describe()) == []


def test_openmetrics_on_request() -> None:
    """A scraper asking for OpenMetrics gets it (ends with # EOF)."""
    registry = build_registry(lambda: snapshot(), process_metrics=False)
    body, content_type = render(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")


def test_empty_fleet_exposition() -> None:
    """A fleet with no agents and no groups still renders (supervisor families only)."""
    snap = snapshot()
    snap.agents, snap.groups = [], []
    got = samples(exposition(snap))
    assert got[("ag1_redis_up", ())] == 1


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
@pytest.mark.parametrize("case", ["rich", "empty", "redis_down"])
def test_promtool_accepts_exposition(case: str) -> None:
    """`promtool check metrics` finds no problems (lint included) in our exposition."""
    snap = rich_snapshot()
    if case == "empty":
        snap.agents, snap.groups = [], []
    elif case == "redis_down":
        snap.redis_up, snap.ready = False, False
    text = exposition(snap, process_metrics=True)
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )
