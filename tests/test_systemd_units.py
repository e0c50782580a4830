"""The shipped systemd units: `systemd-analyze verify` clean, and the directives we promise.

verify runs on a copy whose ExecStart points at the installed console script
(``ag1-fleet`` next to the interpreter running the tests, resolved), because
/usr/local/bin/ag1-fleet does not exist on a build machine. ``User=ag1-fleet`` is
kept: systemd 252's verify does not check that the user exists (the negative-control
test below shows verify does report real mistakes, so a clean run means something).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SCRIPT = Path(sys.executable).parent / "ag1-fleet"  # the venv the tests run in
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
INSTALLED_PATH = "/usr/local/bin/ag1-fleet"

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing")


def unit_copy(tmp_path: Path, name: str, instance: str | None = None) -> Path:
    """A copy of a shipped unit with ExecStart pointed at the installed script."""
    text = (UNITS / name).read_text()
    assert INSTALLED_PATH in text
    text = text.replace(INSTALLED_PATH, str(SCRIPT.resolve()))
    target = tmp_path / (name.replace("@", f"@{instance}") if instance else name)
    target.write_text(text)
    return target


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


def service_section(name: str) -> dict[str, list[str]]:
    """The [Service] directives of a shipped unit (repeated keys collected)."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    values: dict[str, list[str]] = {}
    section = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@needs_analyze
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "instance"), [("ag1-fleet.service", None), ("ag1-fleet@.service", "research")]
)
def test_units_verify_clean(tmp_path: Path, name: str, instance: str | None) -> None:
    """`systemd-analyze verify` accepts both units with no warning at all."""
    assert SCRIPT.exists(), f"install the project first ({SCRIPT} is missing)"
    result = verify(unit_copy(tmp_path, name, instance))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
@pytest.mark.timeout(60)
def test_verify_reports_mistakes(tmp_path: Path) -> None:
    """Negative control: verify flags a bad Type= and unknown keys, so a clean run is meaningful."""
    path = unit_copy(tmp_path, "ag1-fleet.service")
    path.write_text(
        path.read_text()
        .replace("Type=notify", "Type=notifyx")
        .replace("KillMode=mixed", "KillMode=mixed\nWatchdogSecs=30")
    )
    result = verify(path)
    assert "Failed to parse service type" in result.stderr
    assert "Unknown key 'WatchdogSecs'" in result.stderr


@pytest.mark.parametrize("name", ["ag1-fleet.service", "ag1-fleet@.service"])
def test_units_promise_notify_watchdog_and_clean_stop(name: str) -> None:
    """Type=notify, main-only notify, SIGHUP reload, watchdog, restart on failure, mixed kill."""
    s = service_section(name)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["Restart"] == ["on-failure"]
    assert s["KillMode"] == ["mixed"]
    assert s["User"] == ["ag1-fleet"]
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[option] == ["yes"], option
    assert s["ProtectSystem"] == ["strict"]
    assert "MemoryDenyWriteExecute" not in s  # breaks cffi/ctypes callbacks in agents


def test_exec_start_and_state_paths() -> None:
    """Single unit reads /etc/ag1-fleet/fleet.toml; the template %i.toml with its own state."""
    single = service_section("ag1-fleet.service")
    assert single["ExecStart"] == [f"{INSTALLED_PATH} run -c /etc/ag1-fleet/fleet.toml"]
    assert single["StateDirectory"] == ["ag1-fleet"]
    assert single["ReadWritePaths"] == ["/var/lib/ag1-fleet"]
    template = service_section("ag1-fleet@.service")
    assert template["ExecStart"] == [f"{INSTALLED_PATH} run -c /etc/ag1-fleet/%i.toml"]
    assert template["StateDirectory"] == ["ag1-fleet/%i"]
    assert template["ReadWritePaths"] == ["/var/lib/ag1-fleet/%i"]
    assert "AG1_SUPERVISOR__STATE_DIR=/var/lib/ag1-fleet/%i" in template["Environment"]


@pytest.mark.parametrize("name", ["ag1-fleet.service", "ag1-fleet@.service"])
def test_stop_timeout_exceeds_fleet_stop_timeouts(name: str) -> None:
    """TimeoutStopSec leaves room above every stop_timeout in fleet.example.toml and the default."""
    from supervisor.config.load import load_config
    from supervisor.config.models import AgentSettings

    limit = parse_duration(service_section(name)["TimeoutStopSec"][0])
    config = load_config(ROOT / "fleet.example.toml", check_imports=False, environ={})
    longest = max(
        [
            AgentSettings().stop_timeout,
            config.supervisor.stop_timeout,
            *(a.stop_timeout for a in config.agents),
        ]
    )
    assert limit >= longest + 15, (limit, longest)
