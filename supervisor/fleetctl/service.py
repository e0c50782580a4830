"""What the control API asks of the fleet as a whole: the view, and fleet-wide restarts.

:class:`FleetCommands` is held by the :class:`~supervisor.fleet.controller.FleetController`
(``control.fleet``) once the daemon has its Redis client. One fleet roll at a
time per supervisor; its progress (and the last one's outcome) is kept here and
shown by ``GET /v1/fleet`` under ``last_roll``.
"""

from __future__ import annotations

from typing import Any

import anyio

from core_bus.keys import StreamKeyBuilder
from supervisor.fleet.snapshot import ControlError
from supervisor.fleetctl.commands import new_command_id
from supervisor.fleetctl.roll import FleetRoll, roll_fleet
from supervisor.fleetctl.view import fleet_view

#: How long one host may take to run a command and get the agent READY again.
DEFAULT_HOST_TIMEOUT = 120.0


class FleetCommands:
    """Fleet view and fleet-wide control for one supervisor (``name``)."""

    def __init__(self, redis: Any, keys: StreamKeyBuilder, name: str) -> None:
        self._redis = redis
        self._keys = keys
        self.name = name
        self.last_roll: FleetRoll | None = None
        self._lock = anyio.Lock()

    async def view(self) -> dict[str, Any]:
        data = await fleet_view(self._redis, self._keys, asked=self.name)
        data["last_roll"] = self.last_roll.as_json() if self.last_roll else None
        return data

    async def restart(
        self, agent: str, rolling: bool = True, host_timeout: float = DEFAULT_HOST_TIMEOUT
    ) -> dict[str, Any]:
        """Restart ``agent`` on every live member that runs it, one host after the other.

        :returns: ``{"roll": {...}}`` with each host's outcome.
        :raises ControlError: a roll is already running here, no member runs the
            agent, or a host failed (the roll stopped there).
        """
        if self._lock.locked():
            raise ControlError(f"a fleet restart is already running ({self._roll_text()})")
        async with self._lock:
            roll = FleetRoll(new_command_id(), agent, rolling, self.name)
            self.last_roll = roll
            try:
                await roll_fleet(self._redis, self._keys, roll, host_timeout=host_timeout)
            except ControlError:
                raise
            except Exception as exc:  # Redis gone mid-roll: say where it stopped
                roll.state, roll.error = "failed", f"{type(exc).__name__}: {exc}"
                raise ControlError(f"fleet restart of {agent} failed: {roll.error}") from exc
            return {"roll": roll.as_json()}

    def _roll_text(self) -> str:
        roll = self.last_roll
        return f"agent {roll.agent}, roll {roll.id}" if roll else "starting"
