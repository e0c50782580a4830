"""Shared fixtures: a private redis-server per test session, clients, deadlines.

Tests never touch the machine's shared Redis (the default port). Set AG1_TEST_REDIS_URL to
run against an existing server instead of starting one.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from supervisor.redis.server import RedisServerError, RedisServerProcess, find_redis_server

ROOT = Path(__file__).resolve().parent.parent


#: A callback (one step of a task) that blocks the event loop longer than this fails
#: its test: it either burned that much CPU or slept in the kernel (a blocking call).
#: Time the thread merely lost to other processes (the 2-core machine's scheduler,
#: with worker processes and Redis competing for the CPU) does not count.
SLOW_CALLBACK_SECONDS = 0.1


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio in debug mode: never-awaited coroutines and unclosed resources are reported."""
    return ("asyncio", {"debug": True})


class _GcClock:
    """Seconds spent in the cyclic garbage collector: a full collection of the test
    process's heap can take 100 ms, which is not a blocking call of the product."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


_GC = _GcClock()


class _LoopWatch:
    """Times every callback the event loop runs; keeps those that blocked it.

    Wall time alone would also count preemption; ``getrusage(RUSAGE_THREAD)``
    separates the two: CPU time, and voluntary context switches (the thread
    waited in a system call, i.e. a blocking call on the loop).
    """

    def __init__(self) -> None:
        self.reports: list[str] = []
        self._original = asyncio.events.Handle._run
        self.active = False

    def install(self) -> None:
        watch, original = self, self._original

        def timed_run(handle: asyncio.events.Handle) -> None:
            if not watch.active:
                original(handle)
                return
            wall0, gc0 = time.perf_counter(), _GC.seconds
            use0 = resource.getrusage(resource.RUSAGE_THREAD)
            original(handle)
            collecting = _GC.seconds - gc0
            wall = time.perf_counter() - wall0 - collecting
            if wall <= SLOW_CALLBACK_SECONDS:
                return
            use1 = resource.getrusage(resource.RUSAGE_THREAD)
            cpu = (use1.ru_utime + use1.ru_stime) - (use0.ru_utime + use0.ru_stime) - collecting
            waited = use1.ru_nvcsw - use0.ru_nvcsw
            if cpu > SLOW_CALLBACK_SECONDS or (waited and wall - cpu > SLOW_CALLBACK_SECONDS):
                what = _describe(handle)
                if "_run_tests_and_fixtures" in what or "_call_in_runner_task" in what:
                    return  # the test body itself (a blocking subprocess.run of a CLI)
                if "_set_result_unless_cancelled" in what and cpu < SLOW_CALLBACK_SECONDS / 10:
                    # a sleep's wake-up only sets a future: it makes no system call, so its
                    # "wait" was for the GIL, held by a to_thread worker (seen once in CI
                    # while a test's thread SIGKILLed a Redis), not the product blocking
                    return
                watch.reports.append(f"{what[:300]} took {wall:.3f}s (cpu {cpu:.3f}s)")

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]


def _describe(handle: asyncio.events.Handle) -> str:
    """The task a callback steps (its coroutine says where), else the callback."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    if isinstance(task, asyncio.Task):
        return f"task {task.get_name()!r} {task.get_coro()!r}"
    return repr(handle)


_WATCH = _LoopWatch()
_WATCH.install()


@pytest.fixture(autouse=True)
def _no_slow_callbacks() -> Iterator[None]:
    """Fail a test whose event loop was blocked > SLOW_CALLBACK_SECONDS by the product."""
    _WATCH.reports.clear()
    _WATCH.active = True
    try:
        yield
    finally:
        _WATCH.active = False
    if _WATCH.reports:
        pytest.fail("event loop blocked: " + "; ".join(_WATCH.reports[:3]), pytrace=False)


def pytest_report_header(config: pytest.Config) -> str:
    """Which server the session's fixtures start (``AG1_REDIS_SERVER`` picks it)."""
    from supervisor.redis.server import SERVER_ENV, redis_server_identity

    try:
        binary, _ = find_redis_server()
        family, version = redis_server_identity(binary)
    except RedisServerError as exc:
        return f"redis server: none ({exc})"
    choice = os.environ.get(SERVER_ENV) or "newest"
    return f"redis server: {family} {'.'.join(map(str, version))} {binary} ({SERVER_ENV}={choice})"


@pytest.fixture(scope="session")
def redis_binary() -> Path:
    try:
        binary, _version = find_redis_server()
    except RedisServerError as exc:
        pytest.exit(f"cannot run tests: {exc}", returncode=2)
    return binary


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's private redis-server (killed by pid at the end)."""
    external = os.environ.get("AG1_TEST_REDIS_URL")
    if external:
        yield external
        return
    try:
        server = RedisServerProcess(data_dir=tmp_path_factory.mktemp("redis"), appendonly=False)
        server.start()
    except RedisServerError as exc:
        pytest.exit(f"cannot run tests: {exc}", returncode=2)
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    """A fresh async client on an emptied database."""
    client = redis_asyncio.Redis.from_url(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def redis_server_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., RedisServerProcess]]:
    """Start extra private redis-servers for fault tests; all are killed afterwards."""
    started: list[RedisServerProcess] = []

    def start(**kwargs: Any) -> RedisServerProcess:
        data_dir = kwargs.pop("data_dir", tmp_path / f"redis-{len(started)}")
        server = RedisServerProcess(data_dir=data_dir, **kwargs).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def python_exe() -> str:
    """The interpreter running the tests (exec it directly: no pyenv shim)."""
    return sys.executable


@pytest.fixture(autouse=True)
def _reset_bus_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from core_bus.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
