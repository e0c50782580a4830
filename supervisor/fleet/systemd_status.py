"""The supervisor's side of its conversation with systemd (``Type=notify``).

``READY=1`` once the first plan is up (every enabled agent has its ready
workers, or is as settled as it gets: fatal or waiting on a fatal agent),
``STATUS=`` one summary line whenever it changes, ``RELOADING=1`` with
``MONOTONIC_USEC`` around a reload then ``READY=1``, ``STOPPING=1`` on
shutdown, and ``WATCHDOG=1`` at half ``WATCHDOG_USEC`` from the main loop
(only when ``WATCHDOG_PID`` is unset or names us). Without ``NOTIFY_SOCKET``
every send is a no-op.
"""

from __future__ import annotations

import os
import time

import anyio

from core_bus.log import get_logger
from supervisor.runtime.readiness import agent_state, fleet_summary, plan_up
from supervisor.runtime.records import AgentRuntime
from supervisor.runtime.sdnotify import Notifier

log = get_logger("supervisor.fleet.daemon")


class SystemdStatus:
    """Tracks whether the fleet is ready and what systemd was last told."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready = False  # the first plan is up
        self._status_line = ""

    def update(self, agents: dict[str, AgentRuntime]) -> None:
        """After a reconcile pass or a sample: READY=1 the first time, else STATUS= on change."""
        if not self.ready:
            if not plan_up(agents):
                return
            self.ready = True
            fatal = sorted(rt.name for rt in agents.values() if agent_state(rt) == "fatal")
            if fatal:  # settled, but not ready: never say "ready" over a fatal agent
                log.error(
                    "fleet started with fatal agents",
                    agents=len(agents),
                    fatal=fatal,
                    status=fleet_summary(agents),
                )
            else:
                log.info("fleet ready", agents=len(agents))
            self._status_line = fleet_summary(agents)
            self.notifier.send("READY=1", f"STATUS={self._status_line}")
            return
        summary = fleet_summary(agents)
        if summary != self._status_line:
            self._status_line = summary
            self.notifier.send(f"STATUS={summary}")

    def reloading(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def reloaded(self, agents: dict[str, AgentRuntime]) -> None:
        self.notifier.send("READY=1", f"STATUS={fleet_summary(agents)}")

    def stopping(self) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping workers")

    async def watchdog_loop(self, interval: float) -> None:
        while True:
            self.notifier.send("WATCHDOG=1")
            await anyio.sleep(interval)


def watchdog_interval(environ: dict[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, when systemd's watchdog is meant for us."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6
