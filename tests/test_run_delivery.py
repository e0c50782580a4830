"""Daemon wiring of delivery and systemd: crash reclaim, orphans, sd_notify sequence."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from core_bus.envelope import Envelope
from core_bus.publish import publish_many
from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from supervisor.runtime.notify import NotifyMessage, NotifyServer
from supervisor.runtime.sdnotify import Notifier
from tests.fleet_harness import agent, agent_toml, cmd, fleet_toml, running, worker
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

HANGING_HANDLER = """
import os
from pathlib import Path

import anyio

HERE = Path(__file__).parent


async def handle(env, redis):
    flag = HERE / ("hang-" + os.environ["AG1_WORKER"].replace("/", "-"))
    while flag.exists():
        await anyio.sleep(0.05)
    await redis.sadd("reclaim:seen", env.envelope_id)
"""

INBOX = "AG1:agent:hold:inbox"


async def _pending_of(redis: Any, consumer: str) -> int:
    rows = await redis.xpending_range(INBOX, "hold", "-", "+", 1000, consumername=consumer)
    return len(rows)


@pytest.mark.timeout(90)
async def test_sigkilled_worker_entries_go_to_a_sibling_at_once(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """SIGKILL a worker holding pending entries: a sibling gets and handles them at once
    (long before claim_idle), nothing stays pending and the dead consumer is deleted."""
    (tmp_path / "hold_agent.py").write_text(HANGING_HANDLER)
    (tmp_path / "hang-hold-0").write_text("")
    toml = fleet_toml(
        agent_toml(
            "hold", handler="hold_agent:handle", stop_timeout="1s", replicas=1, claim_idle="10m"
        ),
        url=redis_url,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "hold").ready_replicas == 1, timeout=30)
        holder = worker(daemon, "hold")
        assert holder.consumer is not None and holder.pid is not None
        envelopes = [Envelope(role="user", content=i) for i in range(10)]
        await publish_many(redis, INBOX, envelopes)
        await eventually(lambda: _pending_of(redis, holder.consumer or ""), message="pending")
        await eventually(lambda: _count_pending(redis, holder.consumer or "", 10), timeout=15)
        await daemon.control.scale_agent("hold", 2)
        await eventually(lambda: agent(daemon, "hold").ready_replicas == 2, timeout=30)
        os.kill(holder.pid, signal.SIGKILL)
        with anyio.fail_after(15):
            await eventually(
                lambda: _scard_is(redis, "reclaim:seen", 10), timeout=15, message="all handled"
            )
        await eventually(lambda: _group_pending_is(redis, 0), message="all acked")
        await eventually(
            lambda: _consumer_gone(redis, holder.consumer or ""), message="dead consumer deleted"
        )
        assert agent(daemon, "hold").reclaimed_by_reason.get("crash", 0) >= 10
        assert worker(daemon, "hold").last_exit == "killed by SIGKILL (not sent by this supervisor)"


@pytest.mark.timeout(90)
async def test_sweep_runs_at_the_agents_interval(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """A live worker whose only handler slot hangs: it keeps the lease of the running
    entry (never swept from a live handler) but lets go of its queued ones once stalled
    past claim_idle; the daemon's sweep, at the agent's own sweep_interval, hands them to
    the healthy sibling (never back to the holder), which processes them; nobody is killed."""
    (tmp_path / "hold_agent.py").write_text(HANGING_HANDLER)
    (tmp_path / "hang-hold-0").write_text("")
    (tmp_path / "hang-hold-1").write_text("")
    toml = fleet_toml(
        agent_toml(
            "hold",
            handler="hold_agent:handle",
            stop_timeout="1s",
            replicas=2,
            concurrency=1,
            claim_idle="500ms",
            sweep_interval="200ms",
            max_deliveries=100,
        ),
        url=redis_url,
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "hold").ready_replicas == 2, timeout=30)
        pids = sorted(w.pid or 0 for w in agent(daemon, "hold").workers)
        hung = worker(daemon, "hold", 0).consumer or ""
        # READY comes before a worker's first read, so one batch may all go to worker 1:
        # publish until the worker that stays hung holds some (blocked readers take turns).
        total = 0
        while total < 50 and await _pending_of(redis, hung) < 2:
            batch = [Envelope(role="user", content=total + i) for i in range(10)]
            await publish_many(redis, INBOX, batch)
            total += 10
            await eventually(lambda n=total: _group_pending_is(redis, n), timeout=15)
        assert await _pending_of(redis, hung) >= 2, "the hung worker never queued an entry"
        (tmp_path / "hang-hold-1").unlink()  # worker 1 recovers; worker 0 stays hung
        await eventually(
            lambda: _scard_is(redis, "reclaim:seen", total - 1),
            timeout=30,
            message="the hung worker's queued entries processed by its sibling",
        )
        assert await _pending_of(redis, hung) == 1  # the running one: leased, not stolen
        (tmp_path / "hang-hold-0").unlink()
        await eventually(lambda: _scard_is(redis, "reclaim:seen", total), timeout=15)
        await eventually(lambda: _group_pending_is(redis, 0), timeout=15)
        assert agent(daemon, "hold").reclaimed_by_reason.get("idle", 0) >= 1
        assert sorted(w.pid or 0 for w in agent(daemon, "hold").workers) == pids


async def _count_pending(redis: Any, consumer: str, n: int) -> bool:
    return await _pending_of(redis, consumer) == n


async def _group_pending_is(redis: Any, n: int) -> bool:
    info = await redis.xpending(INBOX, "hold")
    return int(info["pending"]) == n


async def _scard_is(redis: Any, key: str, n: int) -> bool:
    return int(await redis.scard(key)) == n


async def _consumer_gone(redis: Any, consumer: str) -> bool:
    names = set()
    for c in await redis.xinfo_consumers(INBOX, "hold"):
        name = c["name"]
        names.add(name.decode() if isinstance(name, bytes) else name)
    return consumer not in names


@pytest.mark.timeout(60)
async def test_supervisor_speaks_sd_notify(tmp_path: Path, python_exe: str) -> None:
    """READY=1 once the plan is up, WATCHDOG=1 at half WATCHDOG_USEC, RELOADING=1 with
    MONOTONIC_USEC then READY=1 on reload, STOPPING=1 on shutdown; children never see
    our NOTIFY_SOCKET/WATCHDOG_USEC."""
    code = "import os, time; assert 'WATCHDOG_USEC' not in os.environ; time.sleep(600)"
    path = tmp_path / "fleet.toml"
    path.write_text(
        textwrap.dedent(fleet_toml(agent_toml("a", cmd(python_exe, code), start_seconds="200ms")))
    )
    config = load_config(path)
    messages: list[NotifyMessage] = []
    with NotifyServer() as systemd:
        environ = dict(os.environ)
        environ.update(
            {
                "NOTIFY_SOCKET": systemd.address,
                "WATCHDOG_USEC": "400000",
                "WATCHDOG_PID": str(os.getpid()),
            }
        )
        daemon = FleetDaemon(
            config,
            config_loader=load_config,
            environ=environ,
            systemd=Notifier(systemd.address),
        )

        async def until(cond: Any) -> None:
            with anyio.fail_after(20):
                while not cond():
                    await anyio.wait_readable(systemd.sock)
                    messages.extend(systemd.receive_ready())

        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            await until(lambda: any(m.ready for m in messages))
            ready_index = next(i for i, m in enumerate(messages) if m.ready)
            assert "1/1 workers ready" in (messages[ready_index].status or "")
            await until(lambda: sum(m.watchdog for m in messages) >= 3)
            assert worker(daemon, "a").restarts == 0  # the child saw no WATCHDOG_USEC
            reload_task_done = anyio.Event()

            async def do_reload() -> None:
                await daemon.control.reload()
                reload_task_done.set()

            tg.start_soon(do_reload)
            await until(lambda: any("RELOADING" in m.fields for m in messages))
            await reload_task_done.wait()
            await until(lambda: any(m.ready for m in messages[_index_of(messages, "RELOADING") :]))
            reloading = messages[_index_of(messages, "RELOADING")]
            assert int(reloading.fields["MONOTONIC_USEC"]) > 0
            daemon.request_stop()
            await until(lambda: any(m.stopping for m in messages))
        assert all(m.pid == os.getpid() for m in messages)


def _index_of(messages: list[NotifyMessage], key: str) -> int:
    return next(i for i, m in enumerate(messages) if key in m.fields)


def test_group_target_carries_ordered_shards(tmp_path: Path) -> None:
    """An ordered agent's GroupTarget says ordered, its unsharded streams and shard count,
    so the rebalancer evicts a dead owner's shard leases at once and the sweep skips it;
    a plain agent stays unordered."""
    from supervisor.delivery.hooks import DeliveryHooks
    from supervisor.runtime.table import AgentRuntime

    (tmp_path / "ord_agent.py").write_text("async def handle(env, redis):\n    pass\n")
    path = tmp_path / "fleet.toml"
    toml = fleet_toml(
        agent_toml(
            "ledger", handler="ord_agent:handle", streams=["ledger:in"], shards=4, ordered=True
        ),
        agent_toml("plain", handler="ord_agent:handle"),
    )
    path.write_text(textwrap.dedent(toml))
    config = load_config(path)
    by_name = {a.name: a for a in config.agents}
    ordered = DeliveryHooks.base_target(AgentRuntime(by_name["ledger"], desired=1))
    assert ordered.ordered is True
    assert ordered.shards == 4
    assert ordered.base_streams == ("ledger:in",)
    assert len(ordered.streams) == 4
    plain = DeliveryHooks.base_target(AgentRuntime(by_name["plain"], desired=1))
    assert plain.ordered is False


@pytest.mark.timeout(90)
async def test_sigkilled_ordered_owner_leases_are_evicted_at_once(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """SIGKILL the owner of ordered shards under the daemon: its shard leases are
    evicted by the crash reclaim and taken over within seconds, far below the 10 s
    lease TTL they would otherwise wait out."""
    from core_bus.keys import StreamKeyBuilder
    from core_bus.streams.replies import text

    (tmp_path / "ord_agent.py").write_text("async def handle(env, redis):\n    pass\n")
    toml = fleet_toml(
        agent_toml(
            "ledger",
            handler="ord_agent:handle",
            streams=["ledger:in"],
            shards=4,
            ordered=True,
            replicas=2,
            stop_timeout="1s",
        ),
        url=redis_url,
    )
    keys = StreamKeyBuilder()
    leases = [keys.shard_lease("ledger", "ledger:in", i) for i in range(4)]

    async def owners() -> set[str]:
        return {text(v) for v in await redis.mget(leases) if v is not None}

    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "ledger").ready_replicas == 2, timeout=30)

        async def split() -> bool:
            return len(await owners()) == 2

        await eventually(split, timeout=30, message="two lease owners")
        victim = worker(daemon, "ledger", 0)
        assert victim.pid is not None and victim.consumer in await owners()
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = anyio.current_time()

        async def handed_over() -> bool:
            current = [text(v) if v is not None else None for v in await redis.mget(leases)]
            return victim.consumer not in current and None not in current

        await eventually(handed_over, timeout=30, interval=0.05, message="leases handed over")
        assert anyio.current_time() - killed_at < 6.0
