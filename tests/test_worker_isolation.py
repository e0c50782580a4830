"""A worker inherits none of the supervisor's secrets, and one worker's spawn error
stays that worker's failed start (the supervisor and the other agents keep running)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from supervisor.runtime import runner as runner_module
from tests.fleet_harness import agent, agent_toml, cmd, run_toml
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

SLEEP = "import time; time.sleep(60)"
SECRETS = {
    "AG1_HTTP__TOKEN": "control-token-xyz",
    "AG1_CONTROL_TOKEN": "control-token-abc",
    "AG1_REDIS__PASSWORD": "redis-pass-1",
    "REDIS_PASSWORD": "redis-pass-2",
}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


async def test_workers_do_not_inherit_the_supervisors_secrets(
    tmp_path: Path, redis_url: str, python_exe: str
) -> None:
    toml = run_toml(
        agent_toml("plain", cmd(python_exe, SLEEP)),
        agent_toml("asks", cmd(python_exe, SLEEP)),
        name="secrets",
        url=redis_url,
        stop_timeout="5s",
    ) + '    env = { REDIS_PASSWORD = "its-own" }\n'  # the last table: "asks"
    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(toml))
    environ = {**os.environ, **SECRETS}
    config = load_config(path, environ={k: v for k, v in environ.items() if k.startswith("AG1_")})
    assert config.http.token is not None  # the supervisor itself has its token
    daemon = FleetDaemon(config, environ=environ)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                await eventually(
                    lambda: all(agent(daemon, n).ready_replicas == 1 for n in ("plain", "asks")),
                    timeout=30,
                )
                (plain,) = agent(daemon, "plain").workers
                (asks,) = agent(daemon, "asks").workers
                assert plain.pid is not None and asks.pid is not None
                seen = _environ(plain.pid)
                assert not set(SECRETS) & set(seen), sorted(set(SECRETS) & set(seen))
                assert not any(v in seen.values() for v in SECRETS.values())
                # What the bus needs it still gets, in the one variable it reads.
                assert seen["REDIS_URL"] == config.redis.effective_url()
                assert _environ(asks.pid)["REDIS_PASSWORD"] == "its-own"  # named in its env
            finally:
                daemon.request_stop()


async def test_a_spawn_error_is_that_workers_failed_start_not_the_supervisors_end(
    tmp_path: Path, redis_url: str, python_exe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runner_module.worker_environment

    def exploding(agent_config: Any, *args: Any) -> dict[str, str]:
        if agent_config.name == "broken":
            raise RuntimeError("unexpected spawn bug")
        return real(agent_config, *args)

    monkeypatch.setattr(runner_module, "worker_environment", exploding)
    toml = run_toml(
        agent_toml("healthy", cmd(python_exe, SLEEP)),
        agent_toml("broken", cmd(python_exe, SLEEP), backoff_initial="50ms", backoff_max="100ms"),
        name="contain",
        url=redis_url,
        stop_timeout="5s",
    )
    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(toml))
    daemon = FleetDaemon(load_config(path))
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                await eventually(lambda: agent(daemon, "healthy").ready_replicas == 1, timeout=30)
                await eventually(lambda: agent(daemon, "broken").state == "fatal", timeout=30)
                assert "fatal" in (agent(daemon, "broken").last_error or "")
                runtime = daemon.table.get("broken")
                assert runtime is not None
                assert runtime.last_start_error == (
                    "broken/0: spawn failed: RuntimeError: unexpected spawn bug"
                )
                (healthy,) = agent(daemon, "healthy").workers
                assert healthy.state == "ready"
            finally:
                daemon.request_stop()
