"""Shared ways to run a fleet in tests: `ag1-fleet run` as a subprocess, or the
FleetDaemon in the test's own event loop.

:class:`FleetProcess` is the subprocess: it writes ``fleet.toml``, starts
``python -m supervisor.cli.main run -c fleet.toml`` in its own session with a JSON log
in a file, and offers the log's events, readiness and HTTP address waits, the
worker pids and a close that never leaves a process behind. :func:`running` is
the in-process daemon with the helpers its tests read snapshots through.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import psutil

from supervisor.config.load import load_config
from supervisor.fleet.daemon import FleetDaemon
from supervisor.fleet.snapshot import AgentSnapshot, WorkerSnapshot
from tests.waiting import eventually_sync

# The parent's systemd conversation and control token must not leak into the
# supervisor under test.
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "AG1_CONTROL_TOKEN")

# ----------------------------------------------------------------------------- subprocess


class FleetProcess:
    """`ag1-fleet run -c fleet.toml` in its own session; its JSON log in a file.

    ``close`` SIGTERMs and waits (``graceful=True``) or SIGKILLs the whole
    session; either way the process is reaped and the log closed.
    """

    def __init__(
        self,
        tmp_path: Path,
        toml: str,
        env: dict[str, str] | None = None,
        *,
        graceful: bool = False,
    ) -> None:
        self.dir = tmp_path
        self.config = tmp_path / "fleet.toml"
        self.write(toml)
        self.log_path = tmp_path / "run.log"
        self._log = self.log_path.open("wb")
        self._graceful = graceful
        environ = dict(os.environ, AG1_LOG_FORMAT="json", AG1_LOG_LEVEL="INFO")
        for name in _SCRUBBED_ENV:
            environ.pop(name, None)
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli.main", "run", "-c", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=str(tmp_path),
            start_new_session=True,
        )
        self.url = ""

    def write(self, toml: str) -> None:
        self.config.write_text(textwrap.dedent(toml))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every JSON log line so far (only those of event ``name`` when given)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and name in (None, event.get("event")):
                out.append(event)
        return out

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events(event) if all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        found = eventually_sync(
            lambda: self.find(event, **fields), timeout=timeout, message=f"event {event!r}"
        )
        return found[-1]  # type: ignore[no-any-return]

    def wait_listening(self, timeout: float = 30) -> str:
        """The control API's base URL once ``http_listening`` is logged; fails fast
        if the supervisor exits first."""

        def listening() -> list[dict[str, Any]]:
            if self.proc.poll() is not None:
                raise AssertionError(f"ag1-fleet run exited {self.proc.returncode}: {self.tail()}")
            return self.events("http_listening")

        event = eventually_sync(listening, timeout, message="http_listening")[-1]
        self.url = f"http://{event['host']}:{event['port']}"
        return self.url

    def worker_pids(self) -> set[int]:
        try:
            return {c.pid for c in psutil.Process(self.proc.pid).children()}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, timeout: float = 20, pids: set[int] | None = None) -> None:
        """SIGTERM; the supervisor must exit 0 within ``timeout`` leaving none of ``pids``."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout) == 0
        assert gone(pids or set())

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None and self._graceful:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@contextmanager
def listening_fleet(
    tmp_path: Path, toml: str, env: dict[str, str] | None = None
) -> Iterator[FleetProcess]:
    """A :class:`FleetProcess` whose control API answers; stopped gracefully after."""
    fleet = FleetProcess(tmp_path, toml, env, graceful=True)
    try:
        fleet.wait_listening()
        yield fleet
    finally:
        fleet.close()


def gone(pids: set[int]) -> bool:
    """No process of ``pids`` is left (a zombie awaiting its reaper counts as gone)."""
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


# ----------------------------------------------------------------------------- in process


def _table(title: str, settings: dict[str, Any], command: str | None = None) -> str:
    """A TOML table indented like the tests' literals: ``command`` is TOML text as
    given, ``settings`` are Python str/int/bool/list values written as TOML."""
    lines = [title]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
        if key == "name" and command is not None:
            lines.append(f"command = {command}")
    return "\n" + "".join(f"    {line}\n" for line in lines)


def header(name: str = "t", url: str = "redis://127.0.0.1:1/0") -> str:
    """[supervisor]/[redis]/[http] for an in-process daemon: no HTTP, 5 s stop timeout."""
    return (
        _table("[supervisor]", {"name": name, "stop_timeout": "5s"})
        + _table("[redis]", {"url": url})
        + _table("[http]", {"enabled": False})
    )


def agent_toml(name: str, command: str | None = None, **settings: Any) -> str:
    """One ``[[agents]]`` table: ``command`` is TOML text as given (see :func:`cmd`),
    every other setting a Python str/int/bool/list written as its TOML value."""
    return _table("[[agents]]", {"name": name, **settings}, command)


def fleet_toml(*agents: str, name: str = "t", url: str = "redis://127.0.0.1:1/0") -> str:
    """:func:`header` followed by the given :func:`agent_toml` tables."""
    return header(name, url) + "".join(agents)


def run_toml(
    *agents: str, name: str, url: str, listen: str | None = None, **supervisor: Any
) -> str:
    """A fleet.toml for `ag1-fleet run`: the supervisor's own defaults but ``supervisor``
    settings, [http] off unless ``listen`` is given, then the :func:`agent_toml` tables."""
    http: dict[str, Any] = {"enabled": False} if listen is None else {"listen": listen}
    return (
        _table("[supervisor]", {"name": name, **supervisor})
        + _table("[redis]", {"url": url})
        + _table("[http]", http)
        + "".join(agents)
    )


@asynccontextmanager
async def running(
    tmp_path: Path, toml: str, sample_interval: float = 5.0
) -> AsyncIterator[FleetDaemon]:
    """A FleetDaemon for ``toml`` running in a task group; stopped on exit (60 s cap)."""
    path = tmp_path / "fleet.toml"
    path.write_text(textwrap.dedent(toml))
    config = load_config(path)
    daemon = FleetDaemon(config, config_loader=load_config, sample_interval=sample_interval)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                yield daemon
            finally:
                daemon.request_stop()


def agent(daemon: FleetDaemon, name: str) -> AgentSnapshot:
    for snap in daemon.control.snapshot().agents:
        if snap.name == name:
            return snap
    raise AssertionError(f"no agent {name}")


def worker(daemon: FleetDaemon, name: str, slot: int = 0) -> WorkerSnapshot:
    """The worker's snapshot; state "absent" while the slot does not exist (yet)."""
    for w in agent(daemon, name).workers:
        if w.slot == slot:
            return w
    return WorkerSnapshot(agent=name, slot=slot, worker_id=f"{name}/{slot}", state="absent")


def cmd(python_exe: str, code: str) -> str:
    """A TOML array running ``code`` with the test interpreter."""
    return f'["{python_exe}", "-c", "{code}"]'


__all__ = [
    "FleetProcess",
    "agent",
    "agent_toml",
    "cmd",
    "fleet_toml",
    "gone",
    "header",
    "listening_fleet",
    "run_toml",
    "running",
    "worker",
]
