"""FleetDaemon in the test's event loop with real child processes and signals.

Command agents are tiny ``python -c`` programs so each test is fast; the
daemon is driven through its FleetControl methods and observed through
snapshots, like the HTTP API does.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import anyio
import pytest

from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from supervisor.fleet.snapshot import ControlError
from tests.fleet_harness import agent, agent_toml, cmd, fleet_toml, header, running, worker
from tests.waiting import eventually

pytestmark = pytest.mark.anyio

READY_THEN_SLEEP = (
    "from supervisor.runtime.sdnotify import sd_notify; import time; "
    "sd_notify('READY=1'); time.sleep(600)"
)


SEGV = "import os, time, signal; time.sleep(0.3); os.kill(os.getpid(), signal.SIGSEGV)"


async def test_always_restarts_a_worker_that_exits(tmp_path: Path, python_exe: str) -> None:
    """restart=always: a worker exiting 0 is restarted with a new pid; exit reason recorded."""
    toml = fleet_toml(
        agent_toml("blink", cmd(python_exe, "import time; time.sleep(0.3)"), start_seconds="100ms"),
    )
    async with running(tmp_path, toml) as daemon:
        first = await eventually(lambda: worker(daemon, "blink").pid, message="first pid")
        await eventually(
            lambda: (w := worker(daemon, "blink")).pid not in (None, first) and w.restarts >= 1,
            message="restarted",
        )
        w = worker(daemon, "blink")
        assert w.last_exit == "exit 0"
        assert agent(daemon, "blink").exits_by_reason.get("exit 0", 0) >= 1


async def test_on_failure_respects_success_exit_codes(tmp_path: Path, python_exe: str) -> None:
    """on-failure: exit 7 listed as success stops; exit 1 restarts."""
    toml = fleet_toml(
        agent_toml(
            "ok7",
            cmd(python_exe, "import time, sys; time.sleep(0.3); sys.exit(7)"),
            restart="on-failure",
            success_exit_codes=[0, 7],
            start_seconds="100ms",
        ),
        agent_toml(
            "bad",
            cmd(python_exe, "import time, sys; time.sleep(0.3); sys.exit(1)"),
            restart="on-failure",
            start_seconds="100ms",
            start_limit=50,
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "ok7").state == "stopped", message="ok7 stopped")
        assert worker(daemon, "ok7").last_exit == "exit 7"
        assert worker(daemon, "ok7").restarts == 0
        await eventually(lambda: worker(daemon, "bad").restarts >= 1, message="bad restarted")
        assert worker(daemon, "bad").last_exit == "exit 1"


async def test_never_leaves_the_worker_stopped(tmp_path: Path, python_exe: str) -> None:
    """restart=never: the worker stays stopped after a failure."""
    toml = fleet_toml(
        agent_toml(
            "once",
            cmd(python_exe, "import time, sys; time.sleep(0.3); sys.exit(1)"),
            restart="never",
            start_seconds="100ms",
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "once").state == "stopped", message="stopped")
        assert worker(daemon, "once").last_exit == "exit 1"
        assert worker(daemon, "once").pid is None


async def test_exit_reasons_say_signal_and_foreign_sigkill(tmp_path: Path, python_exe: str) -> None:
    """A crash by signal is named; a SIGKILL we did not send is not called an OOM kill
    without evidence (the cgroup's oom_kill counter did not rise)."""
    toml = fleet_toml(
        agent_toml("segv", cmd(python_exe, SEGV), restart="never", start_seconds="100ms"),
        agent_toml(
            "victim",
            cmd(python_exe, "import time; time.sleep(600)"),
            restart="never",
            start_seconds="100ms",
        ),
    )
    async with running(tmp_path, toml) as daemon:
        pid = await eventually(lambda: worker(daemon, "victim").pid, message="victim pid")
        await eventually(lambda: worker(daemon, "victim").state == "ready", message="ready")
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: worker(daemon, "victim").state == "stopped", message="reaped")
        assert worker(daemon, "victim").last_exit == (
            "killed by SIGKILL (not sent by this supervisor)"
        )
        await eventually(lambda: worker(daemon, "segv").state == "stopped", message="segv")
        assert worker(daemon, "segv").last_exit == "signal SIGSEGV"


@pytest.mark.timeout(60)
async def test_boot_failures_reach_fatal_and_start_clears_it(
    tmp_path: Path, python_exe: str
) -> None:
    """A worker dying before READY every time goes fatal fast; start_agent tries again."""
    toml = fleet_toml(
        agent_toml(
            "broken",
            cmd(python_exe, "import sys; sys.exit(3)"),
            start_seconds="5s",
            start_limit=2,
            backoff_initial="50ms",
            backoff_max="100ms",
        ),
    )
    async with running(tmp_path, toml) as daemon:
        with anyio.fail_after(15):
            await eventually(lambda: worker(daemon, "broken").state == "fatal", timeout=15)
        snap = agent(daemon, "broken")
        assert snap.state == "fatal"
        assert worker(daemon, "broken").last_exit == "exit 3"
        assert worker(daemon, "broken").status_text  # the fatal reason
        restarts = worker(daemon, "broken").restarts
        await daemon.control.start_agent("broken")
        await eventually(lambda: worker(daemon, "broken").restarts > restarts, message="retried")
        await eventually(lambda: worker(daemon, "broken").state == "fatal", timeout=15)


async def test_watchdog_kills_a_hung_worker(tmp_path: Path, python_exe: str) -> None:
    """READY but no WATCHDOG=1 within `watchdog`: SIGKILLed, reason 'watchdog', restarted."""
    toml = fleet_toml(
        agent_toml(
            "hung", cmd(python_exe, READY_THEN_SLEEP), start_seconds="30s", watchdog="500ms"
        ),
    )
    async with running(tmp_path, toml) as daemon:
        first = await eventually(lambda: worker(daemon, "hung").pid, message="pid")
        await eventually(lambda: worker(daemon, "hung").last_exit == "watchdog", timeout=10)
        await eventually(lambda: worker(daemon, "hung").pid not in (None, first), message="new")
        assert agent(daemon, "hung").exits_by_reason["watchdog"] >= 1


async def test_heartbeats_keep_the_watchdog_quiet(tmp_path: Path, python_exe: str) -> None:
    """A worker sending WATCHDOG=1 in time is never killed."""
    code = (
        "from supervisor.runtime.sdnotify import Notifier; import time; n = Notifier(); "
        "n.send('READY=1'); [(n.send('WATCHDOG=1'), time.sleep(0.1)) for _ in range(6000)]"
    )
    toml = fleet_toml(
        agent_toml("alive", cmd(python_exe, code), start_seconds="30s", watchdog="500ms"),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "alive").state == "ready", message="ready")
        await anyio.sleep(1.5)  # observe: three watchdog periods pass without a kill
        w = worker(daemon, "alive")
        assert w.restarts == 0 and w.last_exit is None
        assert w.last_heartbeat_age_seconds is not None and w.last_heartbeat_age_seconds < 0.5


@pytest.mark.timeout(60)
async def test_memory_limit_restarts_gracefully(tmp_path: Path, python_exe: str) -> None:
    """RSS of the worker over memory_limit: SIGTERM (graceful), reason 'memory limit', restart."""
    code = (
        "from supervisor.runtime.sdnotify import sd_notify; import time; "
        "sd_notify('READY=1'); x = bytearray(120 * 1024 * 1024); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml("hog", cmd(python_exe, code), start_seconds="30s", memory_limit="64MiB"),
    )
    async with running(tmp_path, toml, sample_interval=0.2) as daemon:
        await eventually(lambda: worker(daemon, "hog").last_exit == "memory limit", timeout=20)
        assert agent(daemon, "hog").exits_by_reason["memory limit"] >= 1


async def test_systemd_notify_from_a_shell_agent(tmp_path: Path) -> None:
    """`systemd-notify --ready` from a command agent's shell counts (matched by process group)."""
    script = "sleep 0.2; systemd-notify --ready --status=warmed-up; exec sleep 600"
    toml = fleet_toml(
        agent_toml("shell", f'["/bin/sh", "-c", "{script}"]', start_seconds="60s"),
    )
    async with running(tmp_path, toml) as daemon:
        with anyio.fail_after(10):
            await eventually(lambda: worker(daemon, "shell").state == "ready", timeout=10)
        assert worker(daemon, "shell").status_text == "warmed-up"


async def test_after_waits_for_dependencies_ready(tmp_path: Path, python_exe: str) -> None:
    """An agent with `after` starts only once the named agent's workers are ready."""
    toml = fleet_toml(
        agent_toml(
            "base",
            cmd(python_exe, "import time; time.sleep(600)"),
            start_seconds="700ms",
            replicas=2,
        ),
        agent_toml(
            "top",
            cmd(python_exe, "import time; time.sleep(600)"),
            after=["base"],
            start_seconds="100ms",
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: worker(daemon, "base").pid, message="base spawned")
        assert worker(daemon, "top").state == "absent"
        await eventually(lambda: worker(daemon, "top").state == "ready", timeout=10)
        base_ready = [w.uptime_seconds or 0 for w in agent(daemon, "base").workers]
        top_up = worker(daemon, "top").uptime_seconds or 0
        assert min(base_ready) >= top_up + 0.5
        assert daemon.control.ready


async def test_scale_stop_and_start(tmp_path: Path, python_exe: str) -> None:
    """scale_agent adds/removes workers without touching others; stop/start toggle the agent."""
    toml = fleet_toml(
        agent_toml("pool", cmd(python_exe, "import time; time.sleep(600)"), start_seconds="100ms"),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "pool").ready_replicas == 1)
        first = worker(daemon, "pool").pid
        await daemon.control.scale_agent("pool", 3)
        await eventually(lambda: agent(daemon, "pool").ready_replicas == 3, message="3 ready")
        assert worker(daemon, "pool").pid == first
        await daemon.control.scale_agent("pool", 1)
        await eventually(lambda: len(agent(daemon, "pool").workers) == 1, message="1 left")
        assert worker(daemon, "pool").pid == first
        await daemon.control.stop_agent("pool")
        snap = agent(daemon, "pool")
        assert snap.state == "stopped" and snap.workers[0].pid is None
        await daemon.control.start_agent("pool")
        await eventually(lambda: agent(daemon, "pool").state == "running", message="running")
        with pytest.raises(ControlError):
            await daemon.control.scale_agent("pool", -1)


async def test_restart_agent_replaces_every_worker(tmp_path: Path, python_exe: str) -> None:
    """restart_agent (not rolling) gives every worker a new pid without counting failures."""
    toml = fleet_toml(
        agent_toml("r", cmd(python_exe, READY_THEN_SLEEP), start_seconds="30s", replicas=2),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "r").ready_replicas == 2)
        old = {w.pid for w in agent(daemon, "r").workers}
        await daemon.control.restart_agent("r")
        await eventually(
            lambda: (
                agent(daemon, "r").ready_replicas == 2
                and not ({w.pid for w in agent(daemon, "r").workers} & old)
            ),
            message="all replaced",
        )
        assert {w.last_exit for w in agent(daemon, "r").workers} == {"signal SIGTERM"}


@pytest.mark.timeout(60)
async def test_rolling_restart_keeps_ready_count(tmp_path: Path, python_exe: str) -> None:
    """Rolling restart: replacements get READY before old workers go; ready never drops."""
    code = (
        "from supervisor.runtime.sdnotify import sd_notify; import time; "
        "time.sleep(0.3); sd_notify('READY=1'); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml("roll", cmd(python_exe, code), start_seconds="30s", replicas=3),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "roll").ready_replicas == 3)
        old = {w.pid for w in agent(daemon, "roll").workers}
        lowest = 3
        done = False

        async def watch() -> None:
            nonlocal lowest
            while not done:
                lowest = min(lowest, agent(daemon, "roll").ready_replicas)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await daemon.control.restart_agent("roll", rolling=True)
            done = True
        snap = agent(daemon, "roll")
        assert lowest >= 3
        assert len(snap.workers) == 3 and snap.ready_replicas == 3
        assert not ({w.pid for w in snap.workers} & old)


async def test_failed_rolling_restart_keeps_old_workers(tmp_path: Path, python_exe: str) -> None:
    """A replacement that cannot get ready stops the roll; old workers keep running."""
    flag = tmp_path / "broken"
    code = (
        "import os, sys, time; from supervisor.runtime.sdnotify import sd_notify; "
        f"sys.exit(1) if os.path.exists('{flag}') else None; "
        "sd_notify('READY=1'); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml(
            "fragile", cmd(python_exe, code), start_seconds="30s", start_timeout="5s", replicas=2
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "fragile").ready_replicas == 2)
        old = {w.pid for w in agent(daemon, "fragile").workers}
        flag.write_text("x")
        with pytest.raises(ControlError, match="did not become ready"):
            await daemon.control.restart_agent("fragile", rolling=True)
        await eventually(lambda: len(agent(daemon, "fragile").workers) == 2, message="cleaned")
        snap = agent(daemon, "fragile")
        assert {w.pid for w in snap.workers} == old
        assert snap.ready_replicas == 2


@pytest.mark.timeout(60)
async def test_sighup_reload_applies_the_diff(tmp_path: Path, python_exe: str) -> None:
    """SIGHUP: unchanged agents keep pids, changed are replaced, added start, removed stop."""
    sleep = cmd(python_exe, READY_THEN_SLEEP)
    base = (
        header()
        + f"""
    [[agents]]
    name = "same"
    command = {sleep}
    start_seconds = "30s"
    [[agents]]
    name = "edit"
    command = {sleep}
    start_seconds = "30s"
    env = {{ VERSION = "1" }}
    [[agents]]
    name = "gone"
    command = {sleep}
    start_seconds = "30s"
    [[agents]]
    name = "grow"
    command = {sleep}
    start_seconds = "30s"
    """
    )
    async with running(tmp_path, base) as daemon:
        await eventually(lambda: daemon.control.ready, message="fleet ready")
        pids = {a.name: {w.pid for w in a.workers} for a in daemon.control.snapshot().agents}
        new = base.replace('VERSION = "1"', 'VERSION = "2"').replace(
            '    name = "gone"\n', '    name = "fresh"\n'
        )
        new = new.replace(
            f'name = "grow"\n    command = {sleep}\n',
            f'name = "grow"\n    replicas = 2\n    command = {sleep}\n',
        )
        (tmp_path / "fleet.toml").write_text(textwrap.dedent(new))
        os.kill(os.getpid(), signal.SIGHUP)

        def applied() -> bool:
            names = {a.name for a in daemon.control.snapshot().agents}
            return (
                names == {"same", "edit", "fresh", "grow"}
                and agent(daemon, "fresh").ready_replicas == 1
                and agent(daemon, "grow").ready_replicas == 2
                and agent(daemon, "edit").ready_replicas == 1
                and {w.pid for w in agent(daemon, "edit").workers} != pids["edit"]
            )

        await eventually(applied, timeout=20, message="reload applied")
        assert {w.pid for w in agent(daemon, "same").workers} == pids["same"]
        assert pids["grow"] < {w.pid for w in agent(daemon, "grow").workers}
        assert daemon.control.last_reload_error is None


async def test_invalid_reload_keeps_the_old_plan(tmp_path: Path, python_exe: str) -> None:
    """An invalid file is rejected with its problems; the running workers are untouched."""
    toml = fleet_toml(
        agent_toml("keep", cmd(python_exe, "import time; time.sleep(600)"), start_seconds="100ms"),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: daemon.control.ready, message="ready")
        pid = worker(daemon, "keep").pid
        (tmp_path / "fleet.toml").write_text(textwrap.dedent(toml) + "replicas = -3\n")
        result = await daemon.control.reload()
        assert not result.ok and result.errors
        snap = daemon.control.snapshot()
        assert snap.last_reload_error
        assert worker(daemon, "keep").pid == pid


async def test_snapshot_fields(tmp_path: Path, python_exe: str, redis_url: str) -> None:
    """The snapshot fills supervisor, agent, worker and group fields the HTTP API shows."""
    code = (
        "from supervisor.runtime.sdnotify import Notifier; import time; n = Notifier(); "
        "n.send('READY=1', 'STATUS=serving'); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml("snap", cmd(python_exe, code), start_seconds="30s"),
        url=redis_url,
    )
    async with running(tmp_path, toml, sample_interval=0.2) as daemon:
        await eventually(lambda: worker(daemon, "snap").rss_bytes, message="sampled")
        await eventually(lambda: daemon.control.snapshot().redis_up, message="redis up")
        await eventually(lambda: daemon.control.ready, message="fleet ready")
        snap = daemon.control.snapshot()
        assert snap.supervisor_name == "t" and snap.ready and snap.config_hash
        w = worker(daemon, "snap")
        assert w.state == "ready" and w.status_text == "serving"
        assert w.consumer is not None and w.consumer.startswith("t/snap/0/")
        assert w.uptime_seconds is not None and w.started_at is not None
        assert agent(daemon, "snap").state == "running"
        assert snap.to_dict()["agents"][0]["workers"][0]["pid"] == w.pid


async def test_shutdown_leaves_no_task_process_or_socket(tmp_path: Path, python_exe: str) -> None:
    """After run() returns: no task of the daemon is left, every child is reaped and
    the notify socket directory is gone."""
    import asyncio

    import psutil

    before = set(asyncio.all_tasks())
    toml = fleet_toml(
        agent_toml("a", cmd(python_exe, READY_THEN_SLEEP), start_seconds="30s", replicas=3),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: daemon.control.ready, message="ready")
        pids = {w.pid for w in agent(daemon, "a").workers}
        assert daemon._notify is not None
        socket_dir = Path(daemon._notify.address).parent
        assert socket_dir.exists()
    assert set(asyncio.all_tasks()) <= before
    assert not socket_dir.exists()
    me = psutil.Process()
    assert not [c for c in me.children(recursive=True) if c.pid in pids]
    for pid in pids:
        assert pid is not None and not psutil.pid_exists(pid)


async def test_failed_roll_without_surge_brings_old_workers_back(
    tmp_path: Path, python_exe: str
) -> None:
    """max_surge = 0: old workers go first; if the replacement fails they are started again."""
    flag = tmp_path / "broken"
    code = (
        "import os, sys, time; from supervisor.runtime.sdnotify import sd_notify; "
        f"sys.exit(1) if os.path.exists('{flag}') else None; "
        "sd_notify('READY=1'); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml(
            "nosurge",
            cmd(python_exe, code),
            start_seconds="30s",
            start_timeout="5s",
            max_surge=0,
            max_unavailable=1,
            replicas=2,
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "nosurge").ready_replicas == 2)
        flag.write_text("x")
        with pytest.raises(ControlError):
            await daemon.control.restart_agent("nosurge", rolling=True)
        flag.unlink()
        await eventually(
            lambda: (
                agent(daemon, "nosurge").ready_replicas == 2
                and len(agent(daemon, "nosurge").workers) == 2
            ),
            timeout=20,
            message="old workers back",
        )


async def test_stop_runs_in_reverse_start_order(tmp_path: Path, python_exe: str) -> None:
    """Shutdown stops dependents first: `top` (after = ["base"]) is gone before `base`
    gets its SIGTERM."""
    record = tmp_path / "stops.txt"
    code = (
        "import os, signal, sys, time; "
        "h = lambda *a: (open(sys.argv[1], 'a').write(os.environ['AG1_AGENT'] + chr(10)), "
        "sys.exit(0)); signal.signal(signal.SIGTERM, h); time.sleep(600)"
    )
    command = f'["{python_exe}", "-c", "{code}", "{record}"]'
    toml = fleet_toml(
        agent_toml("base", command, start_seconds="200ms", replicas=2),
        agent_toml("top", command, after=["base"], start_seconds="200ms"),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: daemon.control.ready, message="ready")
    assert record.read_text().split() == ["top", "base", "base"]


@pytest.mark.timeout(60)
async def test_snapshot_shows_rolling_and_why_a_roll_or_start_failed(
    tmp_path: Path, python_exe: str
) -> None:
    """/status data: ``rolling`` is true while a roll runs; a failed roll leaves its
    reason (with the replacement's exit) in ``last_error``; a fatal agent shows its
    fatal reason there."""
    flag = tmp_path / "broken"
    code = (
        "import os, sys, time; from supervisor.runtime.sdnotify import sd_notify; "
        f"time.sleep(0.3) if os.path.exists('{flag}') else None; "
        f"sys.exit(4) if os.path.exists('{flag}') else None; "
        "sd_notify('READY=1'); time.sleep(600)"
    )
    toml = fleet_toml(
        agent_toml(
            "fragile", cmd(python_exe, code), start_seconds="30s", start_timeout="10s", replicas=1
        ),
        agent_toml(
            "broken",
            cmd(python_exe, "import sys; sys.exit(3)"),
            start_seconds="5s",
            start_limit=1,
            backoff_initial="50ms",
            backoff_max="50ms",
        ),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "fragile").ready_replicas == 1)
        snap = agent(daemon, "fragile")
        assert snap.rolling is False and snap.last_error is None
        flag.write_text("x")
        failures: list[str] = []

        async def roll() -> None:
            try:
                await daemon.control.restart_agent("fragile", rolling=True)
            except ControlError as exc:
                failures.append(str(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(roll)
            await eventually(lambda: agent(daemon, "fragile").rolling, message="rolling")
        snap = agent(daemon, "fragile")
        assert failures and snap.rolling is False
        assert snap.last_error == failures[0]
        assert "did not become ready" in snap.last_error and "exit 4" in snap.last_error
        await eventually(lambda: agent(daemon, "broken").state == "fatal", timeout=15)
        error = agent(daemon, "broken").last_error
        assert error is not None and error.startswith("broken/0 fatal:")


def test_restart_sections_see_secret_changes(tmp_path: Path) -> None:
    """A changed Redis password or control token counts as a change of [redis]/[http]
    (model_dump masks secrets, so a plain dump comparison would miss it)."""
    from supervisor.fleet.reload import restart_sections_changed

    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(header()))
    base = {"PATH": os.environ.get("PATH", "")}
    one = load_config(path, environ={**base, "AG1_REDIS__PASSWORD": "one"})
    assert (
        restart_sections_changed(
            one, load_config(path, environ=dict(base, AG1_REDIS__PASSWORD="one"))
        )
        == []
    )
    two = load_config(path, environ={**base, "AG1_REDIS__PASSWORD": "two"})
    assert restart_sections_changed(one, two) == ["redis"]
    tok = load_config(
        path, environ={**base, "AG1_REDIS__PASSWORD": "one", "AG1_CONTROL_TOKEN": "t"}
    )
    assert restart_sections_changed(one, tok) == ["http"]


@pytest.mark.timeout(60)
async def test_reload_with_a_new_redis_password_keeps_workers_and_says_restart(
    tmp_path: Path, python_exe: str
) -> None:
    """Reload after only the Redis password changed: workers keep their pids (the running
    supervisor keeps its connection) and the result names [redis] as needing a restart."""
    path = tmp_path / "fleet.toml"
    path.write_text(
        textwrap.dedent(fleet_toml(agent_toml("steady", cmd(python_exe, READY_THEN_SLEEP))))
    )
    env = dict(os.environ, AG1_REDIS__PASSWORD="old")
    config = load_config(path, environ=env)
    env["AG1_REDIS__PASSWORD"] = "new"
    daemon = FleetDaemon(config, config_loader=lambda p: load_config(p, environ=env))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                await eventually(lambda: agent(daemon, "steady").ready_replicas == 1)
                pid = worker(daemon, "steady").pid
                result = await daemon.control.reload()
                assert result.ok and result.restart_required == ["redis"]
                assert result.unchanged == ["steady"] and not result.changed
                assert worker(daemon, "steady").pid == pid
            finally:
                daemon.request_stop()


async def test_after_a_zero_replica_agent_does_not_block(tmp_path: Path, python_exe: str) -> None:
    """`after = ["x"]` where x has replicas = 0: x counts as satisfied, the dependent
    starts and the fleet reports ready (it must not wait forever)."""
    toml = fleet_toml(
        agent_toml("x", cmd(python_exe, READY_THEN_SLEEP), replicas=0),
        agent_toml("dependent", cmd(python_exe, READY_THEN_SLEEP), after=["x"]),
    )
    async with running(tmp_path, toml) as daemon:
        await eventually(lambda: agent(daemon, "dependent").ready_replicas == 1, timeout=20)
        await eventually(lambda: daemon.control.snapshot().ready, message="fleet ready")
        assert agent(daemon, "x").workers == []


def test_after_a_zero_replica_agent_is_a_warning_not_an_error(tmp_path: Path) -> None:
    """The config still loads (no error); check_agent_warnings names the `after` entry
    that waits for a replicas = 0 agent, and nothing when the agent has replicas."""
    from supervisor.config.checks import check_agent_warnings

    path = tmp_path / "fleet.toml"
    path.write_text(
        textwrap.dedent(
            fleet_toml(
                agent_toml("x", '["true"]', replicas=0),
                agent_toml("y", '["true"]'),
                agent_toml("dependent", '["true"]', after=["x", "y"]),
            )
        )
    )
    config = load_config(path)
    agents = dict(enumerate(config.agents))
    assert check_agent_warnings(agents) == [
        (("agents", 2, "after"), "'x' has replicas = 0, so waiting for it does nothing")
    ]
    agents[0] = agents[0].model_copy(update={"replicas": 1})
    assert check_agent_warnings(agents) == []
