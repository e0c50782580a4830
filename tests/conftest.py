"""Shared fixtures: a private redis-server per test session, clients, deadlines.

Tests never touch the machine's shared Redis (the default port). Set AG1_TEST_REDIS_URL to
run against an existing server instead of starting one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from supervisor.redis.server import RedisServerError, RedisServerProcess, find_redis_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


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
