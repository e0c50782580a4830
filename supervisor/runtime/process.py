"""Spawn, signal and reap one child process; nothing else.

Each child gets its own session/process group (signals go to the whole group)
and, on Linux, a parent-death signal (SIGKILL) so it never outlives a
SIGKILLed supervisor. Exit is noticed through a pidfd the event loop watches:
no polling, no waiter thread per child. The stop escalation (SIGTERM, wait,
SIGKILL) is a parameter of :meth:`ChildProcess.stop`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn setting PR_SET_PDEATHSIG=SIGKILL (async-signal-safe work only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody will signal us.
        if os.getppid() != parent_pid:
            os._exit(255)

    return preexec


#: Run by /bin/sh between setpriv's prctl and the program (same pid throughout):
#: $0 is the supervisor's pid; a different parent means it died before the
#: parent-death signal was armed.
_PARENT_CHECK = 'test "$PPID" = "$0" || exit 4; exec "$@"'


@functools.cache
def _setpriv() -> str | None:
    """util-linux setpriv, when it knows --pdeathsig (2.33+)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out else None


def probe_spawn_tools() -> None:
    """Look up setpriv now (it runs ``setpriv --help``): call it in a worker thread
    before the first spawn, so the event loop never waits for that subprocess."""
    _setpriv()


def _pdeathsig_mode(pdeathsig: bool | str) -> str:
    if sys.platform != "linux" or pdeathsig is False:
        return "off"
    if pdeathsig is True:
        return "exec" if _setpriv() else "preexec"
    if pdeathsig not in ("exec", "preexec", "child", "off"):
        raise ValueError(f"unknown pdeathsig mode {pdeathsig!r}")
    return pdeathsig


@dataclass(frozen=True)
class ExitStatus:
    """How the child ended: an exit code or a signal (exactly one is set)."""

    code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(None, -returncode)
        return cls(returncode, None)

    def describe(self, *, we_sent_kill: bool = False) -> str:
        """'exit 1', 'signal SIGSEGV', 'killed by SIGKILL (not sent by this supervisor)' ..."""
        if self.signal is None:
            return f"exit {self.code}"
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = str(self.signal)
        if self.signal == signal.SIGKILL and not we_sent_kill:
            return f"killed by {name} (not sent by this supervisor)"
        return f"signal {name}"


class ChildProcess:
    """A running child in its own process group; an async context manager.

    Leaving the context (including by cancellation) kills the group and reaps
    the child, so no exit path leaves a process behind.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.exit_status: ExitStatus | None = None
        self.sent_kill = False
        self._pidfd: int | None = None
        self._watching = False
        self._pulse = anyio.Event()
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(self.pid)
        self.stdout_fd: int | None = popen.stdout.fileno() if popen.stdout else None
        self.stderr_fd: int | None = popen.stderr.fileno() if popen.stderr else None
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd is not None:
                os.set_blocking(fd, False)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | str | None = None,
        capture_output: bool = True,
        pdeathsig: bool | str = True,
    ) -> ChildProcess:
        """Start ``argv`` in a new session; raises OSError when it cannot be executed.

        ``pdeathsig`` arms PR_SET_PDEATHSIG=SIGKILL (Linux): ``True`` picks
        ``"exec"`` (``setpriv --pdeathsig KILL`` then ``/bin/sh`` checking the
        parent is still us, then ``exec`` of the program: same pid, and the
        spawn can use vfork) when setpriv exists, else ``"preexec"`` (a
        preexec_fn: a full fork of the daemon, 10-50x slower); ``"child"``
        means the program arms it itself (our worker does); ``False`` none.
        """
        mode = _pdeathsig_mode(pdeathsig)
        argv = list(argv)
        preexec = None
        if mode == "preexec":
            preexec = _pdeathsig_preexec(os.getpid())
        elif mode == "exec":
            # setpriv reports a missing program only as an exit code: check first.
            program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
            if program is None or (cwd is not None and not Path(cwd).is_dir()):
                missing = argv[0] if program is None else str(cwd)
                raise FileNotFoundError(2, "No such file or directory", missing)
            argv = [
                _setpriv() or "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
                "/bin/sh",
                "-c",
                # Armed now; if our parent died before that, we were reparented: leave.
                _PARENT_CHECK,
                str(os.getpid()),
                program,
                *argv[1:],
            ]
        popen = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=str(cwd) if cwd is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_output else None,
            stderr=subprocess.PIPE if capture_output else None,
            start_new_session=True,
            close_fds=True,
            preexec_fn=preexec,  # prctl only; forces fork instead of vfork
        )
        return cls(popen)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> ExitStatus | None:
        """Reap without blocking; the exit status once the child is gone."""
        if self.exit_status is None:
            rc = self._popen.poll()
            if rc is not None:
                self.exit_status = ExitStatus.from_returncode(rc)
        return self.exit_status

    async def wait(self) -> ExitStatus:
        """Return as soon as the child exits (pidfd readable), reaping it.

        Any number of tasks may wait: one watches the pidfd, the others wait
        for it to report (and take over if it is cancelled).
        """
        while True:
            status = self.poll()
            if status is not None:
                return status
            if self._watching:
                pulse = self._pulse
                await pulse.wait()
                continue
            self._watching = True
            try:
                if self._pidfd is not None:
                    await anyio.wait_readable(self._pidfd)
                else:  # pragma: no cover - kernels without pidfd (< 5.3)
                    await anyio.sleep(0.05)
            finally:
                self._watching = False
                self.poll()
                self._pulse.set()
                self._pulse = anyio.Event()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (and the child, if still around)."""
        if sig == signal.SIGKILL:
            self.sent_kill = True
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            if self.exit_status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def signal_child(self, sig: int) -> None:
        """Send ``sig`` to the child process only (e.g. SIGUSR1 nudges)."""
        if self.exit_status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, grace: float, sig: int = signal.SIGTERM) -> ExitStatus:
        """``sig`` to the group, wait up to ``grace`` seconds, then SIGKILL."""
        if self.exit_status is None:
            self.signal_group(sig)
            with anyio.move_on_after(grace):
                return await self.wait()
            self.signal_group(signal.SIGKILL)
        return await self.wait()

    def kill_leftovers(self) -> None:
        """After the leader exited: SIGKILL whatever is left in its process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def aclose(self) -> None:
        """Kill the group if the child still runs, reap it and close pipes (shielded)."""
        with anyio.CancelScope(shield=True):
            if self.poll() is None:
                self.signal_group(signal.SIGKILL)
                await self.wait()
            self.kill_leftovers()
            self._close_pidfd()
            for stream in (self._popen.stdout, self._popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    async def __aenter__(self) -> ChildProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
