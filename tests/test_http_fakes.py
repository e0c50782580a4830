"""A stand-in for the daemon's FleetControl, shared by the HTTP, metrics and CLI tests.

It is not a Redis mock: it only plays the daemon's side of the
``FleetControl`` protocol (snapshots in, control calls recorded). Run as a
module it serves the HTTP API on a free port and prints ``PORT <n>`` so the CLI
tests can drive a real server in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from core_bus.consume.stats import SubscriptionStats
from supervisor.fleet.snapshot import (
    AgentSnapshot,
    ControlError,
    FleetSnapshot,
    GroupSnapshot,
    ReloadResult,
    UnknownAgentError,
    WorkerSnapshot,
)


@dataclass
class HttpSettingsForTest:
    """Has the attributes of ``supervisor.config.models.HttpConfig`` the server reads."""

    host: str = "127.0.0.1"
    port: int = 0
    request_timeout: float = 5.0
    max_body: int = 64 * 1024
    enabled: bool = True
    allowed_hosts: list[str] = field(default_factory=list)

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


def worker(agent: str, slot: int, state: str = "ready", **kw: Any) -> WorkerSnapshot:
    defaults: dict[str, Any] = {
        "pid": 4000 + slot,
        "consumer": f"host:{agent}:{slot}:{4000 + slot}",
        "started_at": time.time() - 60,
        "uptime_seconds": 60.0,
        "last_heartbeat_age_seconds": 0.5,
        "rss_bytes": 50_000_000,
        "cpu_percent": 1.5,
    }
    defaults.update(kw)
    return WorkerSnapshot(
        agent=agent, slot=slot, worker_id=f"{agent}/{slot}", state=state, **defaults
    )


def agent(
    name: str, desired: int = 2, ready: int | None = None, state: str = "running"
) -> AgentSnapshot:
    ready = desired if ready is None else ready
    stats = SubscriptionStats(processed=120, failed=3, dead_lettered=1, malformed=1)
    for seconds in (0.0005, 0.003, 0.003, 0.2, 7.0, 100.0):
        stats.observe_handler(seconds)
    return AgentSnapshot(
        name=name,
        group=f"{name}-group",
        streams=[f"AG1:agent:{name}:inbox"],
        desired_replicas=desired,
        ready_replicas=ready,
        state=state,
        workers=[worker(name, i, "ready" if i < ready else "starting") for i in range(desired)],
        restarts_total=2,
        exits_by_reason={"exit 1": 1, "signal SIGKILL (likely OOM kill)": 1},
        messages=stats,
        reclaimed_by_reason={"crash": 4, "idle": 1},
        deleted_consumers_total=1,
    )


def snapshot(*agents: AgentSnapshot, ready: bool = True, redis_up: bool = True) -> FleetSnapshot:
    agents = agents or (agent("echo"),)
    return FleetSnapshot(
        version="0.1.0",
        supervisor_name="test-host",
        started_at=time.time() - 100,
        uptime_seconds=100.0,
        config_path="/etc/ag1-fleet/fleet.toml",
        config_hash="abc123",
        redis_url="redis://:***@127.0.0.1:6390/0",
        redis_up=redis_up,
        redis_error=None if redis_up else "connection refused",
        agents=list(agents),
        groups=[
            GroupSnapshot(stream=a.streams[0], group=a.group, pending=3, lag=None, consumers=2)
            for a in agents
        ],
        ready=ready,
    )


@dataclass
class FakeControl:
    """Plays the daemon: serves ``snap``, records control calls, can be slow or fail."""

    snap: FleetSnapshot = field(default_factory=snapshot)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    delay: float = 0.0  # seconds each control call takes
    fail_with: Exception | None = None
    reload_result: ReloadResult = field(default_factory=lambda: ReloadResult(ok=True))
    finished: list[tuple[Any, ...]] = field(default_factory=list)

    def snapshot(self) -> FleetSnapshot:
        return self.snap

    async def _act(self, *call: Any) -> None:
        self.calls.append(call)
        name = call[1] if len(call) > 1 else None
        if name is not None and name not in {a.name for a in self.snap.agents}:
            raise UnknownAgentError(name)
        if self.delay:
            await anyio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        self.finished.append(call)

    async def restart_agent(self, name: str, rolling: bool = False) -> None:
        await self._act("restart", name, rolling)

    async def scale_agent(self, name: str, replicas: int) -> None:
        await self._act("scale", name, replicas)

    async def stop_agent(self, name: str) -> None:
        await self._act("stop", name)

    async def start_agent(self, name: str) -> None:
        await self._act("start", name)

    async def reload(self) -> ReloadResult:
        await self._act("reload")
        return self.reload_result


async def _serve(args: argparse.Namespace) -> None:
    from supervisor.http.server import run_http_server

    control = FakeControl()
    if args.reject_reload:
        control.reload_result = ReloadResult(
            ok=False, errors=["fleet.toml: agents[0].replicas: bad"]
        )
    if args.busy:
        control.fail_with = ControlError("a rolling restart of echo is already running")
    settings = HttpSettingsForTest(port=args.port)
    token = os.environ.get("AG1_CONTROL_TOKEN") or None
    async with anyio.create_task_group() as tg:
        _host, port = await tg.start(partial(run_http_server, control, settings, token=token))
        print(f"PORT {port}", flush=True)
        # Leave when the parent closes our stdin (it never outlives its test).
        await anyio.to_thread.run_sync(sys.stdin.read)
        tg.cancel_scope.cancel()


def main() -> None:
    from core_bus.log import configure_logging

    configure_logging(json=True)  # logs to stderr: stdout carries only the PORT line
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reject-reload", action="store_true")
    parser.add_argument("--busy", action="store_true")
    anyio.run(_serve, parser.parse_args())


if __name__ == "__main__":
    main()
