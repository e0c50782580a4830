"""Restart latency and idle cost: ``ag1-fleet run`` vs supervisord 4.x.

Both supervisors run the same program: the built-in worker
(``python -m supervisor.worker``) consuming a private redis-server, 20 copies.
20 times, SIGKILL a random child and time until the supervisor has a
replacement pid (psutil polling every ~1 ms) and, for ours, until the
replacement reported READY=1 (the daemon's "worker ready" log event). Then
each supervisor runs 50 children for ``--idle`` seconds and we read its own
CPU time and RSS (children excluded).

supervisord is installed by this script with pip into a throwaway venv (its
Python package is also called ``supervisor``, so it must never share our venv).

    .venv/bin/python bench/restart_latency.py [--kills 20] [--idle 20] [--skip-supervisord]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from supervisor.redis.server import RedisServerProcess

PYTHON = sys.executable
HANDLER = "async def handle(env):\n    return None\n"

FLEET = """
[supervisor]
name = "bench"
[redis]
url = "{url}"
[http]
enabled = false
[[agents]]
name = "w"
handler = "bench_agent:handle"
replicas = {n}
backoff_reset_after = "0s"
start_limit = 1000
"""

SUPERVISORD = """
[supervisord]
nodaemon = true
logfile = {dir}/supervisord.log
pidfile = {dir}/supervisord.pid
childlogdir = {dir}
loglevel = warn

[program:w]
command = {python} -m supervisor.worker
process_name = %(program_name)s_%(process_num)02d
numprocs = {n}
directory = {dir}
autorestart = true
startsecs = 1
startretries = 1000
stopsignal = TERM
stopasgroup = true
killasgroup = true
stdout_logfile = /dev/null
stderr_logfile = /dev/null
environment = {environment}
"""


SUPERVISORD_ENV = {
    "AG1_AGENT": "w",
    "AG1_WORKER": "w/%(process_num)d",
    "AG1_HANDLER": "bench_agent:handle",
    "AG1_GROUP": "wsd",
    "AG1_CONSUMER": "sd:w:%(process_num)d",
    "AG1_STREAMS": "AG1:agent:wsd:inbox",
    "AG1_WORKING_DIR": "{dir}",
    "REDIS_URL": "{url}",
    "PYTHONUNBUFFERED": "1",
    "AG1_LOG_FORMAT": "json",
}


def supervisord_environment(workdir: Path, url: str) -> str:
    """supervisord's ``environment =`` line for the same worker env we give ours."""
    pairs = (f'{k}="{v.format(dir=workdir, url=url)}"' for k, v in SUPERVISORD_ENV.items())
    return ",".join(pairs)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def children(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return set()


def wait_children(pid: int, n: int, timeout: float = 120.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) >= n:
            return kids
        time.sleep(0.05)
    raise RuntimeError(f"supervisor {pid} did not reach {n} children")


def kill_and_time(sup_pid: int, victims: set[int]) -> tuple[int, int, float, float]:
    """SIGKILL one child; returns (victim, replacement, kill wall time, seconds to new pid)."""
    victim = random.choice(sorted(victims))
    before = children(sup_pid)
    wall = time.time()
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    deadline = t0 + 30
    while time.perf_counter() < deadline:
        new = children(sup_pid) - before
        if new:
            return victim, new.pop(), wall, time.perf_counter() - t0
        time.sleep(0.001)
    raise RuntimeError("no replacement within 30 s")


def stop_supervisor(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the supervisor (it stops its children); SIGKILL its group after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class OurFleet:
    def __init__(self, workdir: Path, url: str, n: int) -> None:
        self.dir = workdir
        self.log_path = workdir / f"ours-{n}.log"
        (workdir / "fleet.toml").write_text(FLEET.format(url=url, n=n))
        env = dict(os.environ, AG1_LOG_FORMAT="json")
        env.pop("NOTIFY_SOCKET", None)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "supervisor.cli.main", "run", "-c", str(workdir / "fleet.toml")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
        self.n = n

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if name not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def wait_ready_pid(self, pid: int, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events("worker ready"):
                if event.get("pid") == pid:
                    return datetime.fromisoformat(
                        event["timestamp"].replace("Z", "+00:00")
                    ).timestamp()
            time.sleep(0.01)
        raise RuntimeError(f"worker {pid} never ready")

    def wait_fleet_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.events("fleet ready"):
                return
            time.sleep(0.1)
        raise RuntimeError("fleet never ready")

    def stop(self) -> None:
        stop_supervisor(self.proc)
        self._log.close()


class Supervisord:
    def __init__(self, venv: Path, workdir: Path, url: str, n: int) -> None:
        conf = workdir / f"supervisord-{n}.conf"
        conf.write_text(
            SUPERVISORD.format(
                dir=workdir,
                python=PYTHON,
                n=n,
                environment=supervisord_environment(workdir, url),
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "supervisord"), "-c", str(conf)],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        stop_supervisor(self.proc)


def install_supervisord(base: Path) -> Path:
    venv = base / "supervisord-venv"
    python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([python, "-m", "venv", str(venv)], check=True, cwd=base)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "supervisor>=4,<5"],
        check=True,
        cwd=base,
    )
    return venv


def idle_cost(pid: int, seconds: float) -> tuple[float, int]:
    proc = psutil.Process(pid)
    c0 = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(seconds)
    c1 = proc.cpu_times()
    elapsed = time.monotonic() - t0
    cpu = (c1.user + c1.system - c0.user - c0.system) / elapsed * 100
    return cpu, proc.memory_info().rss


def bench_ours(workdir: Path, url: str, kills: int, idle: float) -> dict[str, Any]:
    fleet = OurFleet(workdir, url, 20)
    try:
        fleet.wait_fleet_ready()
        pid_times: list[float] = []
        ready_times: list[float] = []
        for _ in range(kills):
            kids = children(fleet.proc.pid)
            _victim, new, wall, to_pid = kill_and_time(fleet.proc.pid, kids)
            ready_wall = fleet.wait_ready_pid(new)
            pid_times.append(to_pid)
            ready_times.append(ready_wall - wall)
            time.sleep(0.2)
    finally:
        fleet.stop()
    fleet50 = OurFleet(workdir, url, 50)
    try:
        fleet50.wait_fleet_ready()
        time.sleep(3)
        cpu, rss = idle_cost(fleet50.proc.pid, idle)
    finally:
        fleet50.stop()
    return {"pid": pid_times, "ready": ready_times, "idle_cpu": cpu, "idle_rss": rss}


def bench_supervisord(
    venv: Path, workdir: Path, url: str, kills: int, idle: float
) -> dict[str, Any]:
    sd = Supervisord(venv, workdir, url, 20)
    try:
        wait_children(sd.proc.pid, 20)
        time.sleep(3)
        pid_times: list[float] = []
        for _ in range(kills):
            kids = children(sd.proc.pid)
            _victim, _new, _wall, to_pid = kill_and_time(sd.proc.pid, kids)
            pid_times.append(to_pid)
            time.sleep(1.2)  # past startsecs, so supervisord counts it RUNNING again
    finally:
        sd.stop()
    sd50 = Supervisord(venv, workdir, url, 50)
    try:
        wait_children(sd50.proc.pid, 50)
        time.sleep(5)
        cpu, rss = idle_cost(sd50.proc.pid, idle)
    finally:
        sd50.stop()
    return {"pid": pid_times, "idle_cpu": cpu, "idle_rss": rss}


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--skip-supervisord", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ag1-restart-bench-") as tmp:
        base = Path(tmp)
        workdir = base / "work"
        workdir.mkdir()
        (workdir / "bench_agent.py").write_text(textwrap.dedent(HANDLER))
        server = RedisServerProcess(data_dir=base / "redis", appendonly=False).start()
        try:
            venv = None if args.skip_supervisord else install_supervisord(base)
            ours = bench_ours(workdir, server.url, args.kills, args.idle)
            theirs = (
                None
                if venv is None
                else bench_supervisord(venv, workdir, server.url, args.kills, args.idle)
            )
        finally:
            server.kill()
    result = {"ours": ours, "supervisord": theirs}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        "| supervisor | replacement pid p50 | p95 | READY p50 | p95 "
        "| idle CPU (50 children) | idle RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| ag1-fleet run | {ms(ours['pid'], 50)} | {ms(ours['pid'], 95)} | "
        f"{ms(ours['ready'], 50)} | {ms(ours['ready'], 95)} | {ours['idle_cpu']:.2f} % | "
        f"{ours['idle_rss'] / 2**20:.0f} MiB |"
    )
    if theirs is not None:
        print(
            f"| supervisord 4.x | {ms(theirs['pid'], 50)} | {ms(theirs['pid'], 95)} | n/a | n/a | "
            f"{theirs['idle_cpu']:.2f} % | {theirs['idle_rss'] / 2**20:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
