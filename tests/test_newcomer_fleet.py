"""Issue 12 against a running `ag1-fleet run` subprocess: what status and the logs say.

Status shows the dead-letter stream's length (the since-start counter named as
such), a counted lag where Redis has none, orphan groups, an agent's own word
that it cannot do its job, and a failed start's exception line; the logs say
"fleet ready" only when it is, "worker ready" once, and a drained worker's
entries are not reclaimed as a "crash"; `reload -c` refuses another file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_harness import FleetProcess, listening_fleet
from tests.waiting import eventually_sync

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parent.parent

HANDLER = """
async def handle(env, redis):
    return None
"""

BROKEN = """
import os
if os.environ.get("AG1_WORKER"):  # fine for `check`, fails inside the worker only
    raise RuntimeError("this agent needs a GPU")

async def handle(env, redis):
    return None
"""


def control(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AG1_", "REDIS_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _bin_without_redis_cli(tmp_path: Path) -> Path:
    """A PATH with what the shell agent needs, but no redis-cli (as on the no-Redis path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "sleep", "systemd-notify"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not installed")
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def _fleet_toml(redis_url: str, bin_dir: Path) -> str:
    return f"""
        [supervisor]
        name = "nc"
        stop_timeout = "5s"
        [redis]
        url = "{redis_url}"
        [http]
        listen = "127.0.0.1:0"
        [[agents]]
        name = "work"
        handler = "nc_agent:handle"
        replicas = 2
        max_surge = 1
        [[agents]]
        name = "idle"
        handler = "nc_agent:handle"
        replicas = 0
        [[agents]]
        name = "shell-agent"
        command = ["sh", "{ROOT / "examples" / "shell_agent.sh"}"]
        bus = false
        env = {{ PATH = "{bin_dir}", SHELL_AGENT_INTERVAL = "0.2" }}
    """


async def _seed(redis: Any) -> None:
    """Dead letters from an earlier run, a group with a NULL lag, an orphan group."""
    for i in range(3):
        await redis.xadd("AG1:dlq:work", {"data": json.dumps({"n": i}), "reason": "old"})
    idle = "AG1:agent:idle:inbox"
    ids = [await redis.xadd(idle, {"data": "{}"}) for _ in range(6)]
    await redis.xgroup_create(idle, "idle", id="0")
    await redis.xreadgroup("idle", "earlier", {idle: ">"}, count=1)
    await redis.xdel(idle, ids[3])
    await redis.xadd("AG1:agent:ghost:inbox", {"data": "{}"})
    await redis.xgroup_create("AG1:agent:ghost:inbox", "ghost", id="0")


async def test_status_shows_dlq_length_lag_orphans_and_a_degraded_agent(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    await _seed(redis)
    (tmp_path / "nc_agent.py").write_text(HANDLER)
    bin_dir = _bin_without_redis_cli(tmp_path)
    with listening_fleet(tmp_path, _fleet_toml(redis_url, bin_dir)) as fleet:
        url = fleet.url
        fleet.wait_event("worker ready", timeout=60, worker="work/1")

        def sampled() -> dict[str, Any] | None:
            status = get_json(url + "/status")
            agents = {a["name"]: a for a in status["agents"]}
            shell = agents["shell-agent"]["workers"][0]
            if agents["work"].get("dlq_length") is None or not status.get("orphan_groups"):
                return None
            return status if "degraded" in (shell.get("status_text") or "") else None

        status = eventually_sync(sampled, timeout=30, message="a sample with the DLQ length")
        agents = {a["name"]: a for a in status["agents"]}
        # 3: the DLQ length; the since-start counter is 0
        assert agents["work"]["dlq_length"] == 3
        assert agents["work"]["messages"]["dead_lettered"] == 0
        [idle] = [g for g in status["groups"] if g["group"] == "idle"]
        assert idle["lag"] == 4 and "counted" in idle["lag_note"]
        assert [(g["stream"], g["group"]) for g in status["orphan_groups"]] == [
            ("AG1:agent:ghost:inbox", "ghost")
        ]
        text = control("status", "--url", url, cwd=tmp_path)
        assert text.returncode == 0, text.stderr
        header = next(line for line in text.stdout.splitlines() if line.startswith("AGENT"))
        assert "DEAD-LETTERED SINCE START" in header and header.rstrip().endswith("DLQ")
        work_row = next(line for line in text.stdout.splitlines() if line.startswith("work "))
        assert work_row.split()[-2:] == ["0", "3"]
        assert "degraded: redis-cli not found" in text.stdout
        assert "ag1-bus groups AG1:agent:ghost:inbox --destroy ghost" in text.stdout
        assert any(line.split()[3] == "4*" for line in text.stdout.splitlines() if "idle" in line)
        lags = [
            line
            for line in get_text(url + "/metrics").splitlines()
            if line.startswith("ag1_group_lag{") and 'group="idle"' in line
        ]
        assert len(lags) == 1 and float(lags[0].rsplit(" ", 1)[1]) == 4, lags
        assert 'ag1_dlq_entries{agent="work"} 3.0' in get_text(url + "/metrics")


def test_shell_agent_says_once_it_cannot_work(redis_url: str, tmp_path: Path) -> None:
    """Without redis-cli the shell agent logs that once (and sets its STATUS=), not
    "holds n/a entries" every heartbeat."""
    (tmp_path / "nc_agent.py").write_text(HANDLER)
    bin_dir = _bin_without_redis_cli(tmp_path)
    with listening_fleet(tmp_path, _fleet_toml(redis_url, bin_dir)) as fleet:

        def up_three_seconds() -> dict[str, Any] | None:
            agents = {a["name"]: a for a in get_json(fleet.url + "/status")["agents"]}
            for worker in agents["shell-agent"]["workers"]:
                if (worker.get("uptime_seconds") or 0) >= 3:
                    return worker  # type: ignore[no-any-return]
            return None

        # heartbeats every 0.2 s: after 3 s of uptime it has had ~15 of them
        worker = eventually_sync(
            up_three_seconds,
            timeout=40,
            message="the shell agent up for 3 s",
        )
        lines = [str(e.get("line", "")) for e in fleet.find("output", agent="shell-agent")]
        assert sum("redis-cli not found" in line for line in lines) == 1, lines
        assert not any("n/a" in line for line in lines), lines
        assert "degraded: redis-cli not found" in str(worker.get("status_text")), worker


def test_worker_ready_once_and_a_drain_is_no_crash(
    redis_url: str, tmp_path: Path
) -> None:
    """Each worker logs "worker ready" once; a rolling restart leaves contiguous slots;
    after it or a stop (workers drain and exit 0) their consumers are reclaimed with
    reason "exit", never "crash"."""
    (tmp_path / "nc_agent.py").write_text(HANDLER)
    bin_dir = _bin_without_redis_cli(tmp_path)
    with listening_fleet(tmp_path, _fleet_toml(redis_url, bin_dir)) as fleet:
        url = fleet.url
        fleet.wait_event("fleet ready", timeout=60)
        for key in ("work/0", "work/1"):
            assert len(fleet.find("worker ready", worker=key)) == 1
        rolled = control("restart", "work", "--rolling", "--url", url, cwd=tmp_path)
        assert rolled.returncode == 0, rolled.stderr
        fleet.wait_event("rolling restart done", timeout=60, agent="work")
        # contiguous slots again (the surge replacement started as work/2), and the
        # renumbered worker's datagrams still count: it handles and reports messages
        [work] = [a for a in get_json(url + "/status")["agents"] if a["name"] == "work"]
        assert sorted(w["worker_id"] for w in work["workers"]) == ["work/0", "work/1"]
        assert fleet.find("worker renumbered", agent="work")
        publish = subprocess.run(
            [sys.executable, "-m", "core_bus.tools.cli", "-q", "publish", "AG1:agent:work:inbox",
             "--text", "after the roll", "--count", "20"],
            env={**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert publish.returncode == 0, publish.stderr

        def processed_per_worker() -> dict[str, int] | None:
            [agent] = [a for a in get_json(url + "/status")["agents"] if a["name"] == "work"]
            if agent["messages"]["processed"] < 20:
                return None
            return {w["worker_id"]: w["state"] for w in agent["workers"]}

        states = eventually_sync(processed_per_worker, timeout=30, message="20 processed")
        assert states == {"work/0": "ready", "work/1": "ready"}
        eventually_sync(
            lambda: len(fleet.find("consumer_reclaimed", agent="work", reason="exit")) >= 2,
            timeout=30,
            message="both old consumers reclaimed as drained",
        )
        # stopped together, neither has a live sibling: they wait as orphans and are
        # reclaimed when the agent starts again, still as "exit"
        assert control("stop", "work", "--url", url, cwd=tmp_path).returncode == 0
        assert control("start", "work", "--url", url, cwd=tmp_path).returncode == 0
        eventually_sync(
            lambda: len(fleet.find("consumer_reclaimed", agent="work", reason="exit")) >= 4,
            timeout=40,
            message="the stopped consumers reclaimed as drained",
        )
        assert fleet.find("consumer_reclaimed", agent="work", reason="crash") == []


def test_reload_with_another_file_is_refused(redis_url: str, tmp_path: Path) -> None:
    """`reload -c other.toml` says the supervisor runs another file and reloads nothing;
    `reload -c` with its own file reloads."""
    (tmp_path / "nc_agent.py").write_text(HANDLER)
    bin_dir = _bin_without_redis_cli(tmp_path)
    with listening_fleet(tmp_path, _fleet_toml(redis_url, bin_dir)) as fleet:
        url = fleet.url
        other = tmp_path / "elsewhere" / "fleet.toml"
        other.parent.mkdir()
        other.write_text(fleet.config.read_text())
        refused = control("reload", "-c", str(other), "--url", url, cwd=tmp_path)
        assert refused.returncode == 1
        assert "refusing" in refused.stderr and str(fleet.config.resolve()) in refused.stderr
        assert get_json(url + "/status")["last_reload_at"] is None
        same = control("reload", "-c", str(fleet.config), "--url", url, cwd=tmp_path)
        assert same.returncode == 0 and same.stdout.startswith("reloaded:"), same.stderr
        assert get_json(url + "/status")["last_reload_at"] is not None


def test_import_error_in_status_and_no_fleet_ready(redis_url: str, tmp_path: Path) -> None:
    """A handler that imports fine for `check` but fails inside the worker: the agent
    goes fatal, status and /status carry the exception line, and the log never says
    "fleet ready"."""
    (tmp_path / "nc_broken.py").write_text(BROKEN)
    toml = f"""
        [supervisor]
        name = "nc"
        [redis]
        url = "{redis_url}"
        [http]
        listen = "127.0.0.1:0"
        [[agents]]
        name = "gpu"
        handler = "nc_broken:handle"
        start_limit = 2
        backoff_initial = "50ms"
    """
    fleet = FleetProcess(tmp_path, toml, graceful=True)
    try:
        url = fleet.wait_listening()
        fleet.wait_event("fleet started with fatal agents", timeout=60)
        assert fleet.find("fleet ready") == []
        [gpu] = get_json(url + "/status")["agents"]
        assert gpu["state"] == "fatal"
        assert "RuntimeError: this agent needs a GPU" in gpu["last_error"]
        text = control("status", "--url", url, cwd=tmp_path)
        assert "gpu: last error: gpu/0 fatal:" in text.stdout
        assert "RuntimeError: this agent needs a GPU" in text.stdout
    finally:
        fleet.close()
