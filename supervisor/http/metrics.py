"""Prometheus metrics built from a :class:`FleetSnapshot` at scrape time.

Nothing here keeps counters of its own: the daemon aggregates what workers
report, and a scrape turns the current snapshot into metric families through a
custom ``prometheus_client`` collector. The exposition format is always written
by ``prometheus_client`` (never by hand), so ``promtool check metrics`` holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from core_bus.consume.stats import HANDLER_BUCKETS, SubscriptionStats
from supervisor.fleet.snapshot import AgentSnapshot, FleetSnapshot

#: Every state a worker can be in; each gets a 0/1 sample so dashboards can sum by state.
WORKER_STATES: tuple[str, ...] = (
    "starting",
    "ready",
    "stopping",
    "exited",
    "backoff",
    "fatal",
    "stopped",
)
#: Every state an agent can be in.
AGENT_STATES: tuple[str, ...] = ("running", "starting", "degraded", "stopped", "fatal")

SnapshotSource = Callable[[], FleetSnapshot]


def cumulative_buckets(stats: SubscriptionStats) -> list[tuple[str, float]]:
    """Turn the non-cumulative per-bucket counts into Prometheus ``le`` buckets."""
    bounds = [*(_format_bound(b) for b in HANDLER_BUCKETS), "+Inf"]
    counts = list(stats.handler_buckets)
    if len(counts) != len(bounds):  # malformed report: keep the exposition valid
        counts = [0] * len(bounds)
    result: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=True):
        running += max(count, 0)
        result.append((bound, float(running)))
    return result


def _format_bound(bound: float) -> str:
    return repr(float(bound))


class FleetCollector(Collector):
    """Builds every ``ag1_*`` family from one snapshot per scrape."""

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # Registering must not take a snapshot (the daemon may not be up yet).
        return []

    def collect(self) -> Iterable[Metric]:
        return list(collect_families(self._source()))


def collect_families(snap: FleetSnapshot) -> Iterator[Metric]:
    """All metric families for ``snap`` (pure: easy to test without a server)."""
    yield from _supervisor_families(snap)
    yield from _agent_families(snap.agents)
    yield from _worker_families(snap.agents)
    yield from _message_families(snap.agents)
    yield from _group_families(snap)
    yield from _membership_families(snap)


def _supervisor_families(snap: FleetSnapshot) -> Iterator[Metric]:
    info = InfoMetricFamily("ag1_supervisor", "Supervisor build and configuration.")
    info.add_metric(
        [],
        {
            "version": snap.version,
            "supervisor": snap.supervisor_name,
            "config_hash": snap.config_hash,
        },
    )
    yield info
    yield GaugeMetricFamily(
        "ag1_supervisor_start_time_seconds",
        "Unix time the supervisor started.",
        value=snap.started_at,
    )
    yield GaugeMetricFamily(
        "ag1_supervisor_uptime_seconds",
        "Seconds since the supervisor started.",
        snap.uptime_seconds,
    )
    yield GaugeMetricFamily(
        "ag1_supervisor_plan_ready",
        "1 once the first plan is up (workers started and ready).",
        value=1.0 if snap.ready else 0.0,
    )
    yield GaugeMetricFamily(
        "ag1_config_last_reload_success",
        "0 when the last reload was rejected (the old plan keeps running), else 1.",
        value=0.0 if snap.last_reload_error else 1.0,
    )
    yield GaugeMetricFamily(
        "ag1_redis_up", "1 when the supervisor can reach Redis.", 1.0 if snap.redis_up else 0.0
    )


def _agent_families(agents: list[AgentSnapshot]) -> Iterator[Metric]:
    desired = _gauge("ag1_agent_desired_replicas", "Workers the plan asks for.")
    ready = _gauge("ag1_agent_ready_replicas", "Workers ready now.")
    state = _gauge(
        "ag1_agent_state", "1 for the agent's current state, 0 otherwise.", ["agent", "state"]
    )
    restarts = _counter("ag1_agent_restarts", "Worker restarts of the agent.")
    exits = _counter("ag1_worker_exits", "Worker exits by reason.", ["agent", "reason"])
    deleted = _counter(
        "ag1_deleted_consumers",
        "Dead consumers deleted from the group after their entries were reclaimed.",
    )
    for agent in agents:
        desired.add_metric([agent.name], agent.desired_replicas)
        ready.add_metric([agent.name], agent.ready_replicas)
        _add_state(state, [agent.name], AGENT_STATES, agent.state)
        restarts.add_metric([agent.name], agent.restarts_total)
        for reason, count in sorted(agent.exits_by_reason.items()):
            exits.add_metric([agent.name, reason], count)
        deleted.add_metric([agent.name], agent.deleted_consumers_total)
    yield from (desired, ready, state, restarts, exits, deleted)


def _worker_families(agents: list[AgentSnapshot]) -> Iterator[Metric]:
    labels = ["agent", "worker"]
    state = _gauge(
        "ag1_worker_state", "1 for the worker's current state, 0 otherwise.", [*labels, "state"]
    )
    restarts = _counter("ag1_worker_restarts", "Restarts of this worker slot.", labels)
    rss = _gauge("ag1_worker_rss_bytes", "Resident memory of the worker.", labels)
    cpu = _gauge("ag1_worker_cpu_percent", "CPU use of the worker (100 = one core).", labels)
    uptime = _gauge("ag1_worker_uptime_seconds", "Seconds since the worker started.", labels)
    heartbeat = _gauge(
        "ag1_worker_heartbeat_age_seconds", "Seconds since the last WATCHDOG=1.", labels
    )
    in_flight = _gauge("ag1_worker_in_flight", "Handlers running now in the worker.", labels)
    for agent in agents:
        for worker in agent.workers:
            key = [agent.name, worker.worker_id]
            _add_state(state, key, WORKER_STATES, worker.state)
            restarts.add_metric(key, worker.restarts)
            in_flight.add_metric(key, worker.in_flight)
            _add_known(rss, key, worker.rss_bytes)
            _add_known(cpu, key, worker.cpu_percent)
            _add_known(uptime, key, worker.uptime_seconds)
            _add_known(heartbeat, key, worker.last_heartbeat_age_seconds)
    yield from (state, restarts, rss, cpu, uptime, heartbeat, in_flight)


def _message_families(agents: list[AgentSnapshot]) -> Iterator[Metric]:
    processed = _counter("ag1_messages_processed", "Entries handled and acked.")
    failed = _counter("ag1_messages_failed", "Handler attempts that raised.")
    dead = _counter("ag1_messages_dead_lettered", "Entries moved to the dead-letter stream.")
    malformed = _counter(
        "ag1_messages_malformed", "Dead-lettered entries that could not be parsed."
    )
    reconnects = _counter("ag1_bus_reconnects", "Worker reconnects to Redis.")
    trimmed = _counter(
        "ag1_dead_letters_trimmed", "Old dead letters dropped by the dead_letter_maxlen trim."
    )
    in_flight = _gauge("ag1_messages_in_flight", "Handlers running now across the agent.")
    dlq = _gauge(
        "ag1_dlq_entries",
        "Entries in the agent's dead-letter stream now, whoever wrote them (XLEN).",
    )
    reclaimed = _counter(
        "ag1_messages_reclaimed",
        "Pending entries handed to live consumers (crash, exit, idle, startup).",
        ["agent", "reason"],
    )
    duration = HistogramMetricFamily(
        "ag1_handler_duration_seconds", "Handler run time.", labels=["agent"]
    )
    for agent in agents:
        stats = agent.messages
        key = [agent.name]
        processed.add_metric(key, stats.processed)
        failed.add_metric(key, stats.failed)
        dead.add_metric(key, stats.dead_lettered)
        malformed.add_metric(key, stats.malformed)
        reconnects.add_metric(key, stats.reconnects)
        trimmed.add_metric(key, stats.dlq_trimmed)
        in_flight.add_metric(key, stats.in_flight)
        _add_known(dlq, key, agent.dlq_length)
        for reason, count in sorted(agent.reclaimed_by_reason.items()):
            reclaimed.add_metric([agent.name, reason], count)
        duration.add_metric(key, cumulative_buckets(stats), sum_value=stats.handler_seconds_sum)
    yield from (
        processed,
        failed,
        dead,
        malformed,
        reconnects,
        trimmed,
        in_flight,
        dlq,
        reclaimed,
        duration,
    )


def _group_families(snap: FleetSnapshot) -> Iterator[Metric]:
    labels = ["stream", "group"]
    pending = _gauge("ag1_group_pending", "Entries delivered but not yet acked.", labels)
    lag = _gauge(
        "ag1_group_lag",
        "Entries not yet delivered to the group (counted by the supervisor where Redis "
        "reports none; omitted when unknown).",
        labels,
    )
    consumers = _gauge("ag1_group_consumers", "Consumers in the group.", labels)
    matched = _gauge(
        "ag1_agent_pattern_streams",
        "Streams a stream pattern of the agent matches (per-stream group series are capped).",
        ["agent", "pattern"],
    )
    for agent in snap.agents:
        for pattern, count in sorted(agent.patterns.items()):
            matched.add_metric([agent.name, pattern], count)
    for group in snap.groups:
        key = [group.stream, group.group]
        _add_known(pending, key, group.pending)
        _add_known(lag, key, group.lag)
        _add_known(consumers, key, group.consumers)
    yield from (pending, lag, consumers, matched)


def _gauge(name: str, doc: str, labels: Sequence[str] = ("agent",)) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: Sequence[str] = ("agent",)) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _states(known: tuple[str, ...], current: str) -> tuple[str, ...]:
    """Known states plus ``current`` if the daemon reports one we do not know."""
    return known if current in known else (*known, current)


def _add_known(family: GaugeMetricFamily, key: list[str], value: float | None) -> None:
    """Add a sample only when the value is known: unknown is omitted, never reported as 0."""
    if value is not None:
        family.add_metric(key, value)


def _add_state(
    family: GaugeMetricFamily, key: list[str], known: tuple[str, ...], current: str
) -> None:
    """One 0/1 sample per state (1 for ``current``), labelled ``[*key, state]``."""
    for name in _states(known, current):
        family.add_metric([*key, name], 1.0 if name == current else 0.0)


def build_registry(source: SnapshotSource, *, process_metrics: bool = True) -> CollectorRegistry:
    """A registry holding the fleet collector (and the supervisor's own ``process_*``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(source))
    if process_metrics:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition for ``accept`` (text format by default, OpenMetrics on request)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def _membership_families(snap: FleetSnapshot) -> Iterator[Metric]:
    """Fleet membership as this supervisor sees it (absent before the daemon wires it)."""
    view = snap.membership
    if not view:
        return
    me = [snap.supervisor_name]
    members = GaugeMetricFamily(
        "ag1_fleet_members",
        "Supervisors of the fleet by lease state (alive, or dead and not yet reclaimed).",
        labels=["supervisor", "state"],
    )
    members.add_metric([*me, "alive"], float(view.get("members", 0)))
    members.add_metric([*me, "dead"], float(view.get("dead_members", 0)))
    yield members
    cut_off = GaugeMetricFamily(
        "ag1_fleet_cut_off",
        "1 while this supervisor could not renew its membership lease for lease_ttl.",
        labels=["supervisor"],
    )
    cut_off.add_metric(me, 1.0 if view.get("cut_off") else 0.0)
    yield cut_off
    rejoins = CounterMetricFamily(
        "ag1_fleet_rejoins",
        "Times this supervisor rejoined under a new incarnation (its lease had lapsed).",
        labels=["supervisor"],
    )
    rejoins.add_metric(me, float(view.get("rejoins", 0)))
    yield rejoins
    reclaimed = CounterMetricFamily(
        "ag1_fleet_reclaimed_entries",
        "Entries this supervisor reclaimed from each dead member.",
        labels=["supervisor", "member"],
    )
    for member, n in sorted((view.get("reclaimed_entries") or {}).items()):
        reclaimed.add_metric([*me, member], float(n))
    yield reclaimed
    expired = CounterMetricFamily(
        "ag1_fleet_members_expired",
        "Dead member incarnations this supervisor noticed (lease expired).",
        labels=["supervisor"],
    )
    expired.add_metric(me, float(view.get("expired_seen", 0)))
    yield expired
