"""The pure worker state machine: restart policies, backoff, start limit, timers (fake clock)."""

from __future__ import annotations

import random
from dataclasses import replace

from supervisor.runtime.lifecycle import (
    CAUSE_MEMORY,
    CAUSE_RESTART,
    CAUSE_STOP,
    CAUSE_WATCHDOG,
    Action,
    ExitInfo,
    RestartPolicy,
    WorkerLifecycle,
    WorkerState,
)

POLICY = RestartPolicy(
    restart="always",
    backoff_initial=1.0,
    backoff_max=8.0,
    backoff_reset_after=60.0,
    start_limit=5,
    start_limit_window=60.0,
    start_timeout=10.0,
    jitter=0.0,
)


def started(
    policy: RestartPolicy = POLICY, now: float = 0.0, ready: bool = True
) -> WorkerLifecycle:
    lc = WorkerLifecycle(policy, rng=random.Random(1))
    lc.request_start(now)
    assert lc.tick(now) == Action("spawn")
    lc.on_spawned(now)
    if ready:
        assert lc.on_ready(now + 0.1)
    return lc


def run_again(lc: WorkerLifecycle, now: float, ready: bool = True) -> None:
    assert lc.state == WorkerState.BACKOFF
    assert lc.restart_at is not None and lc.restart_at <= now
    assert lc.tick(now) == Action("spawn")
    lc.on_spawned(now)
    if ready:
        lc.on_ready(now)


def test_states_of_a_normal_life() -> None:
    """starting -> ready -> stopping -> stopped when we stop it."""
    lc = started(ready=False)
    assert lc.state == WorkerState.STARTING
    lc.on_ready(1.0)
    assert lc.state == WorkerState.READY
    assert lc.on_stop_requested(CAUSE_STOP)
    assert lc.state == WorkerState.STOPPING
    assert lc.on_exit(2.0, ExitInfo(code=0, reason="exit 0")) == WorkerState.STOPPED
    assert lc.restarts == 0


def test_always_restarts_even_after_success() -> None:
    """restart=always: a clean exit 0 is restarted at once."""
    lc = started()
    assert lc.on_exit(100.0, ExitInfo(code=0)) == WorkerState.BACKOFF
    assert lc.restart_at == 100.0
    assert lc.restarts == 1


def test_on_failure_restarts_only_failures() -> None:
    """restart=on-failure: exit 0 stops, exit 1 and signals restart."""
    policy = replace(POLICY, restart="on-failure")
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(code=0)) == WorkerState.STOPPED
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(code=1)) == WorkerState.BACKOFF
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(signal=11)) == WorkerState.BACKOFF


def test_success_exit_codes_count_as_success() -> None:
    """An exit code listed in success_exit_codes is not a failure."""
    policy = replace(POLICY, restart="on-failure", success_exit_codes=frozenset({0, 7}))
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(code=7)) == WorkerState.STOPPED
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(code=8)) == WorkerState.BACKOFF


def test_never_does_not_restart() -> None:
    """restart=never: any exit ends in stopped."""
    policy = replace(POLICY, restart="never")
    lc = started(policy)
    assert lc.on_exit(100.0, ExitInfo(code=1)) == WorkerState.STOPPED


def test_backoff_is_exponential_from_the_first_repeated_failure() -> None:
    """First failure restarts at once; then 1, 2, 4, 8, 8 s (capped)."""
    policy = replace(POLICY, start_limit=100)
    lc = started(policy)
    now = 100.0
    delays = []
    for _ in range(6):
        lc.on_exit(now, ExitInfo(code=1))
        assert lc.restart_at is not None
        delays.append(lc.restart_at - now)
        now = lc.restart_at
        run_again(lc, now)
        now += 1.0  # crashes 1 s after becoming ready
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_backoff_has_bounded_jitter() -> None:
    """Jitter spreads restarts but stays within +/- jitter and backoff_max."""
    policy = replace(POLICY, jitter=0.2, start_limit=100)
    lc = started(policy)
    lc.failures_in_row = 3  # next failure -> 4th in a row -> base 4 s
    lc.on_exit(1.0, ExitInfo(code=1))
    assert lc.restart_at is not None
    assert 3.2 <= lc.restart_at - 1.0 <= 4.8


def test_backoff_resets_after_staying_up() -> None:
    """A worker that stayed up backoff_reset_after restarts immediately again."""
    lc = started()
    now = 10.0
    for _ in range(3):
        lc.on_exit(now, ExitInfo(code=1))
        assert lc.restart_at is not None
        now = lc.restart_at
        run_again(lc, now)
        now += 1.0
    assert lc.failures_in_row == 3
    now += 120.0  # long healthy run
    lc.on_exit(now, ExitInfo(code=1))
    assert lc.restart_at == now
    assert lc.failures_in_row == 1


def test_start_limit_reaches_fatal() -> None:
    """More than start_limit restarts within the window -> fatal, with a reason."""
    policy = replace(POLICY, start_limit=3, backoff_initial=0.1, backoff_max=0.1)
    lc = started(policy)
    now = 1.0
    states = []
    for _ in range(4):
        states.append(lc.on_exit(now, ExitInfo(code=1)))
        if lc.state == WorkerState.BACKOFF:
            assert lc.restart_at is not None
            now = lc.restart_at
            run_again(lc, now)
            now += 0.5
    assert states == [WorkerState.BACKOFF] * 3 + [WorkerState.FATAL]
    assert lc.fatal_reason is not None and "within" in lc.fatal_reason
    assert lc.tick(now + 1000) is None


def test_restarts_outside_the_window_do_not_count() -> None:
    """Restarts spread wider than start_limit_window never reach fatal."""
    policy = replace(POLICY, start_limit=2, start_limit_window=10.0)
    lc = started(policy)
    now = 0.0
    for _ in range(10):
        now += 30.0
        assert lc.on_exit(now, ExitInfo(code=0)) == WorkerState.BACKOFF
        run_again(lc, now)


def test_boot_failures_reach_fatal_quickly() -> None:
    """A worker that always dies before READY is a failed start, fatal after the limit."""
    policy = replace(POLICY, start_limit=3, backoff_initial=0.05, backoff_max=0.1)
    lc = started(policy, ready=False)
    now = 0.2
    for _ in range(10):
        state = lc.on_exit(now, ExitInfo(code=3))
        if state == WorkerState.FATAL:
            break
        assert lc.restart_at is not None
        now = lc.restart_at
        run_again(lc, now, ready=False)
        now += 0.2
    assert lc.state == WorkerState.FATAL
    assert now < 2.0


def test_exit_code_zero_before_ready_is_a_failed_start() -> None:
    """Dying before READY counts as a failure even with a success code."""
    policy = replace(POLICY, restart="on-failure")
    lc = started(policy, ready=False)
    assert lc.on_exit(1.0, ExitInfo(code=0)) == WorkerState.BACKOFF
    assert lc.boot_failures_in_row == 1


def test_request_start_clears_fatal() -> None:
    """start_agent (request_start) takes a fatal worker back to spawning."""
    policy = replace(POLICY, start_limit=1)
    lc = started(policy)
    lc.on_exit(1.0, ExitInfo(code=1))
    run_again(lc, 1.0)
    assert lc.on_exit(1.5, ExitInfo(code=1)) == WorkerState.FATAL
    lc.request_start(2.0)
    assert lc.state == WorkerState.BACKOFF
    assert lc.tick(2.0) == Action("spawn")
    assert lc.fatal_reason is None


def test_start_timeout_kills_a_worker_that_never_gets_ready() -> None:
    """No READY within start_timeout -> kill (a failed start)."""
    lc = started(ready=False)
    assert lc.next_deadline() == 10.0
    assert lc.tick(9.9) is None
    action = lc.tick(10.0)
    assert action is not None and action.kind == "kill"


def test_ready_after_start_seconds_for_commands() -> None:
    """A command that does not speak sd_notify is ready after start_seconds."""
    policy = replace(POLICY, ready_after=1.5)
    lc = started(policy, ready=False)
    assert lc.tick(1.0) is None
    assert lc.tick(1.5) == Action("ready")


def test_watchdog_deadline_moves_with_heartbeats() -> None:
    """No WATCHDOG=1 for `watchdog` seconds -> kill; each heartbeat moves the deadline."""
    policy = replace(POLICY, watchdog=2.0)
    lc = started(policy)  # ready at 0.1
    assert lc.tick(2.0) is None
    lc.on_heartbeat(1.5)
    assert lc.next_deadline() == 3.5
    assert lc.tick(3.4) is None
    assert lc.tick(3.5) == Action("kill", CAUSE_WATCHDOG)


def test_watchdog_kill_counts_as_failure_under_on_failure() -> None:
    """A watchdog kill is a failure even though we sent the signal."""
    policy = replace(POLICY, restart="on-failure", watchdog=1.0)
    lc = started(policy)
    lc.on_stop_requested(CAUSE_WATCHDOG)
    assert lc.on_exit(5.0, ExitInfo(signal=9, cause=CAUSE_WATCHDOG)) == WorkerState.BACKOFF
    assert lc.failures_in_row == 1


def test_requested_restart_and_memory_restart_always_restart() -> None:
    """A restart we asked for (or a memory-limit restart) restarts even under never."""
    policy = replace(POLICY, restart="never")
    lc = started(policy)
    lc.on_stop_requested(CAUSE_RESTART)
    assert lc.on_exit(1.0, ExitInfo(code=0)) == WorkerState.BACKOFF
    assert lc.failures_in_row == 0
    run_again(lc, 1.0)
    lc.on_stop_requested(CAUSE_MEMORY)
    assert lc.on_exit(2.0, ExitInfo(code=0)) == WorkerState.BACKOFF
    assert lc.last_exit is not None and lc.last_exit.cause == CAUSE_MEMORY


def test_stop_wins_over_a_pending_restart() -> None:
    """A stop requested while a restart is pending ends stopped."""
    lc = started()
    lc.on_stop_requested(CAUSE_RESTART)
    lc.on_stop_requested(CAUSE_STOP)
    assert lc.on_exit(1.0, ExitInfo(code=0)) == WorkerState.STOPPED


def test_stop_during_backoff_cancels_the_restart() -> None:
    """Stopping a worker waiting in backoff leaves it stopped, no spawn."""
    lc = started()
    lc.on_exit(1.0, ExitInfo(code=1))
    assert not lc.on_stop_requested(CAUSE_STOP)
    assert lc.state == WorkerState.STOPPED
    assert lc.tick(100.0) is None


def test_policy_from_agent_config() -> None:
    """RestartPolicy.from_agent reads the resolved AgentConfig (commands get ready_after)."""
    from supervisor.config.models import AgentConfig

    agent = AgentConfig(name="x", command=["true"], restart="on-failure", start_seconds=2.0)
    policy = RestartPolicy.from_agent(agent)
    assert policy.restart == "on-failure"
    assert policy.ready_after == 2.0
    handler = AgentConfig(name="y", handler="m:f")
    assert RestartPolicy.from_agent(handler).ready_after is None


def test_stop_request_wins_over_a_watchdog_kill() -> None:
    """Stopping, then killed by the watchdog while draining: stopped, reason kept."""
    policy = replace(POLICY, watchdog=1.0)
    lc = started(policy)
    lc.on_stop_requested(CAUSE_STOP)
    lc.on_stop_requested(CAUSE_WATCHDOG)
    state = lc.on_exit(5.0, ExitInfo(signal=9, cause=CAUSE_WATCHDOG, reason="watchdog"))
    assert state == WorkerState.STOPPED
    assert lc.last_exit is not None and lc.last_exit.reason == "watchdog"


def _kill_loop(lc: WorkerLifecycle, kills: int, up_for: float, **exit_fields: object) -> list[str]:
    """SIGKILL the worker ``kills`` times, each time ``up_for`` seconds after READY."""
    now = 1.0
    states = []
    for _ in range(kills):
        now += up_for
        states.append(str(lc.on_exit(now, ExitInfo(signal=9, **exit_fields))))  # type: ignore[arg-type]
        if lc.state != WorkerState.BACKOFF:
            break
        assert lc.restart_at is not None
        now = max(now, lc.restart_at)
        run_again(lc, now)
    return states


def test_stable_workers_killed_often_never_go_fatal() -> None:
    """24 external SIGKILLs of workers that were up longer than min_uptime: restarts with
    backoff, never fatal (only unstable restarts count toward start_limit)."""
    policy = replace(POLICY, start_limit=5, min_uptime=0.5, backoff_max=0.8)
    lc = started(policy)
    states = _kill_loop(lc, 24, up_for=0.6)
    assert states == ["backoff"] * 24 and lc.fatal_reason is None
    assert lc.backoff_delay() > 0  # the streak still backs off


def test_unstable_restarts_still_reach_fatal() -> None:
    """Dying within min_uptime of READY counts toward start_limit."""
    policy = replace(POLICY, start_limit=3, min_uptime=10.0, backoff_initial=0.1, backoff_max=0.1)
    lc = started(policy)
    states = _kill_loop(lc, 10, up_for=0.2)
    assert states == ["backoff"] * 3 + ["fatal"]


def test_a_crash_on_a_message_never_counts_toward_fatal() -> None:
    """A worker that died running a crash suspect alone failed on the message, not as a
    process: however quick and frequent, never fatal, and the backoff does not grow."""
    policy = replace(POLICY, start_limit=2, min_uptime=10.0)
    lc = started(policy)
    states = _kill_loop(lc, 20, up_for=0.01, message_failure=True)
    assert states == ["backoff"] * 20 and lc.backoff_delay() == 0.0
