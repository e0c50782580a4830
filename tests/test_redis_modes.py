"""Connection-mode settings without a server: ``[redis]`` validation, what workers are
given, ``connect()``'s dispatch and ``ag1-bus``'s mode flags."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster

from core_bus.connection import ConnectionConfigError, parse_sentinels
from core_bus.settings import BusSettings, connect
from supervisor.config.load import ConfigError, load_config
from supervisor.redis.target import connect_options, worker_redis_env
from supervisor.runtime.worker_env import child_environment

pytestmark = pytest.mark.anyio

AGENT = '[[agents]]\nname = "a"\ncommand = ["true"]\n'


def _problems(tmp_path: Path, redis: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "fleet.toml"
    path.write_text("[redis]\n" + textwrap.dedent(redis) + AGENT)
    try:
        load_config(path, environ=env or {}, check_imports=False)
    except ConfigError as exc:
        return [line.removeprefix(f"{path}: ") for line in exc.problems]
    return []


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        (
            'mode = "sentinel"\n',
            [
                'redis.sentinels: mode = "sentinel" needs sentinels = ["host:port", ...]',
                'redis.master_name: mode = "sentinel" needs master_name',
            ],
        ),
        (
            'url = "embedded"\nmode = "cluster"\n',
            [
                'redis.mode: the embedded Redis is standalone; mode = "cluster" needs url '
                '(cluster: a seed node) or mode = "standalone"'
            ],
        ),
        (
            'mode = "cluster"\nsentinels = ["h:26379"]\n',
            ['redis.sentinels: only used with mode = "sentinel", not "cluster"'],
        ),
        (
            'mode = "sentinel"\nsentinels = ["h"]\nmaster_name = "m"\n',
            ["redis.sentinels: invalid sentinel address 'h': expected host:port"],
        ),
        (
            'url = "unix:///tmp/r.sock"\nmode = "sentinel"\nsentinels = ["h:1"]\n'
            'master_name = "m"\n',
            ["redis.url: a unix socket cannot be used with mode sentinel"],
        ),
        (
            'durability = "always"\n',
            ["redis.durability: must be 'none' or 'replicated' (got 'always')"],
        ),
        ('sentinel_password = "x"\n', None),
    ],
)
def test_redis_mode_problems_one_line_each(
    tmp_path: Path, redis: str, expected: list[str] | None
) -> None:
    """Each contradiction or gap of ``[redis]`` is one line naming the field."""
    problems = _problems(tmp_path, redis)
    if expected is None:  # a secret in the file
        assert problems == [
            "redis.sentinel_password: secrets are not allowed in the file; set "
            "AG1_REDIS__SENTINEL_PASSWORD or REDIS_SENTINEL_PASSWORD in the environment"
        ]
        return
    assert [p.replace('"', "'") for p in problems] == [e.replace('"', "'") for e in expected]


def test_check_cli_exit_2_for_incomplete_sentinel_mode(tmp_path: Path) -> None:
    """``ag1-fleet check``: exit 2, one line per problem on stderr, no traceback."""
    path = tmp_path / "fleet.toml"
    path.write_text('[redis]\nmode = "sentinel"\n' + AGENT)
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.cli.main", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["redis.sentinels", "redis.master_name"]
    assert "Traceback" not in done.stderr


def test_sentinel_settings_reach_workers_and_secrets_stay_in_env(tmp_path: Path) -> None:
    """The sentinel password comes from the environment only, reaches workers as
    REDIS_SENTINEL_PASSWORD (set from the config, never inherited), and the durability
    settings travel as REDIS_DURABILITY/REDIS_REPLICAS_TO_WAIT/REDIS_WAIT_TIMEOUT (ms)."""
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[redis]\nmode = "sentinel"\nsentinels = ["10.0.0.1:26379", "[::1]:26380"]\n'
        'master_name = "ag1"\ndurability = "replicated"\nreplicas_to_wait = 2\n'
        'wait_timeout = "250ms"\n' + AGENT
    )
    config = load_config(path, environ={"REDIS_SENTINEL_PASSWORD": "s3cret"}, check_imports=False)
    assert config.redis.sentinel_password is not None
    assert "s3cret" not in repr(config.redis)
    env = worker_redis_env(config.redis)
    assert env == {
        "REDIS_MODE": "sentinel",
        "REDIS_SENTINELS": "10.0.0.1:26379,[::1]:26380",
        "REDIS_MASTER_NAME": "ag1",
        "REDIS_SENTINEL_PASSWORD": "s3cret",
        "REDIS_DURABILITY": "replicated",
        "REDIS_REPLICAS_TO_WAIT": "2",
        "REDIS_WAIT_TIMEOUT": "250",
    }
    options = connect_options(config.redis)
    assert options["sentinels"] == [("10.0.0.1", 26379), ("::1", 26380)]
    inherited = child_environment(
        {"AG1_REDIS__SENTINEL_PASSWORD": "x", "REDIS_SENTINEL_PASSWORD": "y", "PATH": "/bin"}
    )
    assert inherited == {"PATH": "/bin"}
    settings = BusSettings(_env_file=None, **{k.lower(): v for k, v in env.items()})
    assert settings.redis_mode == "sentinel" and settings.redis_wait_timeout == 250


def test_embedded_is_always_standalone_for_workers(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[redis]\nurl = "embedded"\n' + AGENT)
    config = load_config(path, environ={}, check_imports=False)
    assert worker_redis_env(config.redis)["REDIS_MODE"] == "standalone"
    assert connect_options(config.redis) == {"mode": "standalone"}


async def test_connect_dispatches_on_mode() -> None:
    """standalone -> Redis, cluster -> RedisCluster (nothing is contacted until used),
    sentinel without sentinels or master name -> ConnectionConfigError, like an unknown
    mode or a unix socket outside standalone."""
    plain = connect("redis://127.0.0.1:1/0", mode="standalone")
    assert type(plain) is AsyncRedis
    await plain.aclose()
    cluster = connect("redis://127.0.0.1:1/0", mode="cluster")
    assert isinstance(cluster, RedisCluster)
    await cluster.aclose()
    with pytest.raises(ConnectionConfigError, match="at least one sentinel"):
        connect("redis://127.0.0.1:1/0", mode="sentinel", sentinels=[], master_name="m")
    with pytest.raises(ConnectionConfigError, match="master name"):
        connect("redis://127.0.0.1:1/0", mode="sentinel", sentinels="h:1")
    with pytest.raises(ConnectionConfigError, match="unknown Redis mode"):
        connect("redis://127.0.0.1:1/0", mode="replicated")
    with pytest.raises(ConnectionConfigError, match="unix socket"):
        connect("unix:///tmp/x.sock", mode="sentinel", sentinels="h:1", master_name="m")


async def test_sentinel_client_takes_credentials_from_the_url() -> None:
    """In sentinel mode the URL gives the master's username, password and db only."""
    client = connect(
        "redis://bob:pw@ignored:1/3", mode="sentinel", sentinels="127.0.0.1:1", master_name="m"
    )
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("bob", "pw", 3)
        assert "host" not in kwargs or kwargs["host"] != "ignored"
    finally:
        await client.aclose()


def test_parse_sentinels() -> None:
    assert parse_sentinels("a:1, b:2,") == [("a", 1), ("b", 2)]
    assert parse_sentinels(["[::1]:3"]) == [("::1", 3)]
    with pytest.raises(ConnectionConfigError):
        parse_sentinels("a:0")


def test_ag1_bus_sentinel_mode_needs_sentinels_and_says_the_mode() -> None:
    """``ag1-bus --redis-mode sentinel`` without sentinels: exit 2 with the fix; with
    them, the "which Redis" line names the mode and the sentinels."""
    base = [sys.executable, "-m", "core_bus.tools.cli"]
    done = subprocess.run(
        [*base, "--redis-mode", "sentinel", "tail", "s", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "sentinel mode needs --sentinel HOST:PORT" in done.stderr
    from core_bus.tools.connection import resolve_mode

    mode = resolve_mode("sentinel", ["127.0.0.1:1"], "m")
    assert mode.describe() == " in sentinel mode: master 'm' via 127.0.0.1:1"
    assert mode.options() == {
        "mode": "sentinel",
        "sentinels": [("127.0.0.1", 1)],
        "master_name": "m",
    }


def test_replicated_durability_is_refused_on_a_cluster(tmp_path: Path) -> None:
    """WAIT carries no key: a cluster client cannot route it to the write's node, so
    the combination is a config error instead of a silently unreplicated write."""
    problems = _problems(
        tmp_path, 'url = "redis://127.0.0.1:7000"\nmode = "cluster"\ndurability = "replicated"\n'
    )
    assert len(problems) == 1 and "redis.durability" in problems[0]
    assert "cluster" in problems[0]


def test_redis_mode_from_the_environment_fills_the_config(tmp_path: Path) -> None:
    """REDIS_MODE=cluster (what core_bus reads) also makes the supervisor connect in
    cluster mode when fleet.toml says nothing: otherwise its keys were tagged for a
    cluster but its own clients (membership included) talked standalone (MOVED)."""
    path = tmp_path / "fleet.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:7000"\n' + AGENT)
    config = load_config(path, environ={"REDIS_MODE": "cluster"}, check_imports=False)
    assert config.redis.mode == "cluster"
    assert connect_options(config.redis) == {"mode": "cluster"}
    path.write_text('[redis]\nurl = "redis://127.0.0.1:7000"\nmode = "standalone"\n' + AGENT)
    config = load_config(path, environ={"REDIS_MODE": "cluster"}, check_imports=False)
    assert config.redis.mode == "standalone"  # the file wins
    path.write_text('[redis]\nurl = "embedded"\n' + AGENT)
    config = load_config(path, environ={"REDIS_MODE": "cluster"}, check_imports=False)
    assert config.redis.mode == "standalone"  # the embedded server is standalone


async def test_replicated_write_on_a_cluster_client_is_refused_before_any_io() -> None:
    from core_bus.durability import queue_wait, resolve_durability

    policy = resolve_durability("replicated")
    assert policy is not None
    client = RedisCluster.from_url("redis://127.0.0.1:1")  # never connected
    with pytest.raises(ValueError, match="not supported on Redis Cluster"):
        await queue_wait(client.pipeline(), client, policy)
