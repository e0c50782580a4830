"""Child processes: own process group, exit status, stop escalation, cleanup, log capture."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import anyio
import psutil
import pytest
import structlog

from supervisor.runtime.logcapture import CaptureStats, LineCapture, TokenBucket
from supervisor.runtime.process import ChildProcess, ExitStatus

pytestmark = pytest.mark.anyio

ENV = dict(os.environ)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_exit_status_descriptions() -> None:
    """Exit code vs signal; an unexpected SIGKILL says we did not send it (not "OOM")."""
    assert ExitStatus.from_returncode(0).describe() == "exit 0"
    assert ExitStatus.from_returncode(3).describe() == "exit 3"
    assert ExitStatus.from_returncode(-11).describe() == "signal SIGSEGV"
    assert ExitStatus.from_returncode(-9).describe() == (
        "killed by SIGKILL (not sent by this supervisor)"
    )
    assert ExitStatus.from_returncode(-9).describe(we_sent_kill=True) == "signal SIGKILL"


async def test_child_runs_in_its_own_process_group(python_exe: str) -> None:
    """The child leads a new session/group, so signals to the group never reach us."""
    async with ChildProcess.spawn(
        [python_exe, "-c", "import time; time.sleep(60)"], env=ENV
    ) as child:
        assert os.getpgid(child.pid) == child.pid
        assert os.getpgid(child.pid) != os.getpgid(0)
        child.signal_group(signal.SIGTERM)
        status = await child.wait()
    assert status == ExitStatus(None, signal.SIGTERM)


async def test_exit_is_noticed_at_once(python_exe: str) -> None:
    """wait() returns as soon as the child exits (pidfd), with its exit code."""
    async with ChildProcess.spawn([python_exe, "-c", "raise SystemExit(5)"], env=ENV) as child:
        with anyio.fail_after(10):
            status = await child.wait()
    assert status.code == 5


async def test_several_waiters(python_exe: str) -> None:
    """Many tasks may wait on one child; all see the same status."""
    results: list[ExitStatus] = []
    async with ChildProcess.spawn([python_exe, "-c", "import time; time.sleep(0.2)"], env=ENV) as c:

        async def waiter() -> None:
            results.append(await c.wait())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(waiter)
    assert results == [ExitStatus(0, None)] * 3


async def test_stop_escalates_to_sigkill(python_exe: str) -> None:
    """A child ignoring SIGTERM is SIGKILLed after the grace period."""
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('armed', flush=True); time.sleep(60)"
    )
    async with ChildProcess.spawn([python_exe, "-c", code], env=ENV) as child:
        assert child.stdout_fd is not None
        await anyio.wait_readable(child.stdout_fd)  # SIGTERM is ignored from here on
        started = time.monotonic()
        with anyio.fail_after(10):
            status = await child.stop(0.3)
        assert 0.25 <= time.monotonic() - started < 5
    assert status.signal == signal.SIGKILL
    assert status.describe(we_sent_kill=child.sent_kill) == "signal SIGKILL"


async def test_stop_is_graceful_when_the_child_obeys(python_exe: str) -> None:
    """SIGTERM handled by the child: it exits with its own code before the grace ends."""
    code = (
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "print('armed', flush=True); time.sleep(60)"
    )
    async with ChildProcess.spawn([python_exe, "-c", code], env=ENV) as child:
        assert child.stdout_fd is not None
        await anyio.wait_readable(child.stdout_fd)
        with anyio.fail_after(10):
            status = await child.stop(30)
    assert status == ExitStatus(0, None)


async def test_cancellation_kills_and_reaps_the_group(python_exe: str) -> None:
    """Leaving the context by cancellation kills the child and its grandchildren."""
    code = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    grandchild = 0
    with anyio.move_on_after(20) as scope:
        async with ChildProcess.spawn([python_exe, "-c", code], env=ENV) as child:
            assert child.stdout_fd is not None
            await anyio.wait_readable(child.stdout_fd)
            grandchild = int(os.read(child.stdout_fd, 100).split()[0])
            pid = child.pid
            scope.cancel()
            await anyio.sleep(30)
    assert grandchild and child.exit_status is not None
    assert not _alive(pid)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        await anyio.sleep(0.02)
    assert not _alive(grandchild)


async def test_spawn_of_a_missing_program_raises() -> None:
    """A command that cannot be executed raises OSError at spawn (reported as a failed start)."""
    with pytest.raises(OSError):
        ChildProcess.spawn(["/nonexistent/program"], env=ENV)


@pytest.mark.parametrize("mode", ["exec", "preexec"])
async def test_parent_death_signal_kills_the_child(python_exe: str, mode: str) -> None:
    """A child spawned with pdeathsig (via setpriv or a preexec_fn) dies with its parent."""
    code = (
        "import anyio, sys, time\n"
        "from supervisor.runtime.process import ChildProcess\n"
        "async def main():\n"
        "    c = ChildProcess.spawn([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        f"                           env={{}}, capture_output=False, pdeathsig={mode!r})\n"
        "    print(c.pid, flush=True)\n"
        "    await anyio.sleep(60)\n"
        "anyio.run(main)\n"
    )
    async with ChildProcess.spawn([python_exe, "-c", code], env=ENV, pdeathsig=False) as parent:
        assert parent.stdout_fd is not None
        with anyio.fail_after(20):
            await anyio.wait_readable(parent.stdout_fd)
        grandchild = int(os.read(parent.stdout_fd, 100).split()[0])
        os.kill(parent.pid, signal.SIGKILL)
        await parent.wait()
        deadline = time.monotonic() + 5
        while _alive(grandchild) and time.monotonic() < deadline:
            await anyio.sleep(0.02)
        assert not _alive(grandchild)


# -- log capture ----------------------------------------------------------------------------


async def _capture(python_exe: str, code: str, **kwargs: Any) -> tuple[CaptureStats, list[Any]]:
    stats = CaptureStats()
    bucket = TokenBucket(rate=kwargs.pop("rate", 1000.0), burst=kwargs.pop("burst", 1000.0))
    with structlog.testing.capture_logs() as logs:
        async with ChildProcess.spawn([python_exe, "-c", code], env=ENV) as child:
            assert child.stdout_fd is not None
            capture = LineCapture(
                child.stdout_fd,
                "stdout",
                bucket,
                stats,
                fields={"agent": "a", "worker": "a/0", "pid": child.pid},
                **kwargs,
            )
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(capture.run)
                    status = await child.wait()
            assert status.code == 0
    return stats, logs


async def test_output_lines_become_events(python_exe: str) -> None:
    """Each stdout line is one event with agent/worker/pid/stream; a last partial line too."""
    code = "import sys; print('one'); print('two'); sys.stdout.write('tail')"
    stats, logs = await _capture(python_exe, code)
    lines = [e for e in logs if e["event"] == "output"]
    assert [e["line"] for e in lines] == ["one", "two", "tail"]
    assert lines[0]["agent"] == "a" and lines[0]["worker"] == "a/0" and lines[0]["pid"]
    assert lines[0]["stream"] == "stdout"
    assert stats.lines == 3 and stats.dropped == 0


async def test_long_lines_are_truncated(python_exe: str) -> None:
    """A line longer than max_line is cut and flagged."""
    code = "print('x' * 50000); print('short')"
    stats, logs = await _capture(python_exe, code, max_line=100)
    lines = [e for e in logs if e["event"] == "output"]
    assert len(lines[0]["line"]) == 100 and lines[0]["truncated"] is True
    assert lines[1]["line"] == "short"
    assert stats.truncated == 1


@pytest.mark.timeout(60)
async def test_flooding_child_is_never_blocked(python_exe: str) -> None:
    """A child writing 200k lines finishes promptly; excess lines are counted as dropped."""
    code = "import sys\nfor i in range(200000): sys.stdout.write(f'line {i}\\n')\n"
    started = time.monotonic()
    stats, logs = await _capture(python_exe, code, rate=100.0, burst=500.0)
    assert time.monotonic() - started < 20
    emitted = [e for e in logs if e["event"] == "output"]
    assert len(emitted) < 2000
    assert stats.dropped + stats.lines == 200000
    dropped_events = [e for e in logs if e["event"] == "output dropped"]
    assert dropped_events and sum(e["dropped"] for e in dropped_events) == stats.dropped


async def test_json_log_lines_are_re_emitted_as_events(python_exe: str) -> None:
    """A child's JSON log line becomes its own event with its fields and level,
    tagged with agent/worker/pid/stream (ours win on conflicts)."""
    code = (
        "import json; print(json.dumps({'event': 'subscription_started', 'level': 'warning', "
        "'group': 'g', 'worker': 'spoofed', 'timestamp': 'x', 'logger_name': 'core_bus'}))"
    )
    stats, logs = await _capture(python_exe, code)
    (event,) = [e for e in logs if e["event"] == "subscription_started"]
    assert event["log_level"] == "warning"
    assert event["group"] == "g" and event["worker"] == "a/0" and event["stream"] == "stdout"
    assert event["child_logger"] == "core_bus"
    assert stats.lines == 1


async def test_exec_mode_keeps_the_program_pid(python_exe: str) -> None:
    """Through setpriv and the parent check, the program still runs as the spawned pid."""
    async with ChildProcess.spawn(
        [python_exe, "-c", "import os; print(os.getpid(), os.getppid(), flush=True)"],
        env=ENV,
        pdeathsig="exec",
    ) as child:
        assert child.stdout_fd is not None
        with anyio.fail_after(10):
            status = await child.wait()
        pid, ppid = (int(x) for x in os.read(child.stdout_fd, 100).split())
    assert status.code == 0
    assert pid == child.pid and ppid == os.getpid()


@pytest.mark.timeout(60)
async def test_flooding_child_does_not_starve_the_event_loop(python_exe: str) -> None:
    """While a child keeps its pipe full, other tasks of the loop still run promptly."""
    code = (
        "import sys, time\n"
        "line = 'x' * 200 + '\\n'\n"
        "end = time.monotonic() + 1.5\n"
        "while time.monotonic() < end: sys.stdout.write(line * 500)\n"
    )
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.monotonic()
        while not done:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    stats = CaptureStats()
    bucket = TokenBucket(rate=100.0, burst=100.0)
    with structlog.testing.capture_logs():
        async with ChildProcess.spawn([python_exe, "-c", code], env=ENV) as child:
            assert child.stdout_fd is not None
            capture = LineCapture(child.stdout_fd, "stdout", bucket, stats)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ticker)
                    tg.start_soon(capture.run)
                    await child.wait()
                    done = True
    assert stats.dropped > 10_000
    assert max(gaps) < 0.5, f"loop stalled for {max(gaps):.3f}s"
