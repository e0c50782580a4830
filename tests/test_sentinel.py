"""Sentinel mode against a real deployment (1 master, 1 replica, 3 sentinels; one per module).

Pins: the environment and fleet.toml connect through the sentinels; a READONLY
reply (a connection still open to a demoted master) drops the connection and
surfaces as a transient ConnectionError; WAIT is sent only with
``durability = "replicated"`` and a shortfall raises ReplicationTimeout; a
fleet in sentinel mode keeps processing across ``SENTINEL FAILOVER`` and a
SIGKILLed master without restarting its workers, /readyz turns 503 and back,
and with ``durability = "replicated"`` no confirmed publish is lost.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core_bus.envelope import Envelope
from core_bus.errors import ReplicationTimeout
from core_bus.publish import publish_envelope
from core_bus.settings import connect
from core_bus.streams.errors import is_transient
from supervisor.config.load import load_config
from supervisor.redis.target import connect_options, worker_redis_env
from tests.fleet_harness import FleetProcess
from tests.sentinel_harness import SentinelSet
from tests.waiting import eventually, eventually_sync

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    deployment = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.close()


def _sentinel_env(deployment: SentinelSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_MODE", "sentinel")
    monkeypatch.setenv("REDIS_SENTINELS", ",".join(deployment.addresses))
    monkeypatch.setenv("REDIS_MASTER_NAME", deployment.master_name)


async def _served_by(client: Any) -> int:
    """The port of the server that answered (INFO server tcp_port)."""
    return int((await client.info("server"))["tcp_port"])


@pytest.mark.timeout(30)
async def test_connect_from_environment_reaches_the_master(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REDIS_MODE=sentinel + REDIS_SENTINELS + REDIS_MASTER_NAME: ``connect()`` asks the
    sentinels and talks to the master; closing it closes the sentinel connections too."""
    _sentinel_env(sentinels, monkeypatch)
    client = connect()
    try:
        assert await client.set("sentinel:env", "1")
        assert await _served_by(client) == sentinels.master_port()
        manager = client.connection_pool.sentinel_manager
    finally:
        await client.aclose()
    for sentinel_client in manager.sentinels:
        pool = sentinel_client.connection_pool
        assert not any(c.is_connected for c in pool._available_connections)


@pytest.mark.timeout(30)
async def test_fleet_toml_sentinel_mode_checks_and_connects(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    """``[redis] mode = "sentinel"``: ``ag1-fleet check`` names the mode (exit 0), the
    supervisor's connect options and the workers' variables reach the master."""
    path = tmp_path / "fleet.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [redis]
            url = "redis://127.0.0.1:1/0"
            mode = "sentinel"
            sentinels = {sentinels.addresses!r}
            master_name = "{sentinels.master_name}"
            durability = "replicated"
            [[agents]]
            name = "a"
            command = ["true"]
            """
        ).replace("'", '"')
    )
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.cli.main", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert f"sentinel master '{sentinels.master_name}' via 127.0.0.1:" in done.stdout
    config = load_config(path, check_imports=False)
    client = connect(config.redis.effective_url(), **connect_options(config.redis))
    try:
        assert await _served_by(client) == sentinels.master_port()
    finally:
        await client.aclose()
    env = worker_redis_env(config.redis)
    assert env["REDIS_MODE"] == "sentinel"
    assert env["REDIS_SENTINELS"] == ",".join(sentinels.addresses)
    assert env["REDIS_MASTER_NAME"] == sentinels.master_name
    assert env["REDIS_DURABILITY"] == "replicated"
    assert "REDIS_SENTINEL_PASSWORD" not in env


@pytest.mark.timeout(30)
async def test_readonly_reply_drops_the_connection_and_is_transient(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sentinel-managed connection still open to a server that is now a replica (a
    demoted master) gets READONLY on a write: redis-py disconnects it and raises
    ConnectionError (transient for every loop of the bus); the next command re-asks
    the sentinels and lands on the master. Pins redis-py's behaviour (8.x)."""
    _sentinel_env(sentinels, monkeypatch)
    client = connect()
    try:
        await client.ping()
        pool = client.connection_pool
        stale = pool.make_connection()
        await stale.connect_to(("127.0.0.1", sentinels.replica_port()))
        await stale.send_command("XADD", "sentinel:ro", "*", "f", "v")
        with pytest.raises(RedisConnectionError) as caught:
            await stale.read_response()
        assert is_transient(caught.value)
        assert not stale.is_connected
        # the same connection object, reconnected by sending (what a single-connection
        # client such as the subscription's reader does): it must ask the sentinels again
        await stale.send_command("XADD", "sentinel:ro", "*", "f", "v")
        assert await stale.read_response()
        assert stale.port == sentinels.master_port()
        await stale.disconnect()
        assert await client.xadd("sentinel:ro", {"f": "v"})
        assert await _served_by(client) == sentinels.master_port()
    finally:
        await client.aclose()


@pytest.mark.timeout(30)
async def test_blocked_read_on_a_demoted_master_is_transient(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server turning into a replica answers blocked clients ``UNBLOCKED force unblock
    ...``: the sentinel-managed connection drops and raises ConnectionError (a plain
    ResponseError would have ended the worker), and the client's next read reaches the
    real master. The demotion is staged on the replica (REPLICAOF NO ONE, then back to
    the master), so the deployment ends as it began."""
    _sentinel_env(sentinels, monkeypatch)
    client = connect()
    try:
        pool = client.connection_pool
        conn = pool.make_connection()
        await conn.connect_to(("127.0.0.1", sentinels.replica_port()))
        await conn.send_command("XREAD", "BLOCK", "5000", "STREAMS", "sentinel:blk", "$")
        import redis.asyncio as redis_asyncio

        async with redis_asyncio.Redis(port=sentinels.replica_port()) as replica:
            await eventually(lambda: _blocked_clients(replica), 5, message="the XREAD is blocked")
            await replica.execute_command("REPLICAOF", "NO", "ONE")
            await replica.execute_command("REPLICAOF", "127.0.0.1", sentinels.master_port())
        with pytest.raises(RedisConnectionError) as caught:
            await conn.read_response()
        assert is_transient(caught.value)
        assert not conn.is_connected
        await conn.disconnect()
        assert await _served_by(client) == sentinels.master_port()
    finally:
        await client.aclose()
    await anyio.to_thread.run_sync(sentinels.wait_settled)


async def _blocked_clients(client: Any) -> bool:
    return int((await client.info("clients"))["blocked_clients"]) > 0


async def _wait_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


@pytest.mark.timeout(30)
async def test_wait_is_sent_only_when_replicated(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability none: a publish sends no WAIT (cmdstat_wait stays 0); replicated: one
    WAIT in the publish's pipeline; asking for more replicas than exist raises
    ReplicationTimeout naming the counts (the entry itself was written)."""
    _sentinel_env(sentinels, monkeypatch)
    client = connect()
    try:
        await client.config_resetstat()
        env = Envelope(role="user", content="x")
        await publish_envelope(client, "sentinel:wait", env)
        await publish_envelope(client, "sentinel:wait", env)
        assert await _wait_calls(client) == 0
        await publish_envelope(client, "sentinel:wait", env, durability="replicated")
        assert await _wait_calls(client) == 1
        monkeypatch.setenv("REDIS_REPLICAS_TO_WAIT", "2")
        monkeypatch.setenv("REDIS_WAIT_TIMEOUT", "50")
        from core_bus.settings import get_settings

        get_settings.cache_clear()
        before = await client.xlen("sentinel:wait")
        with pytest.raises(ReplicationTimeout) as caught:
            await publish_envelope(client, "sentinel:wait", env, durability="replicated")
        assert (caught.value.acked, caught.value.wanted) == (1, 2)
        assert await client.xlen("sentinel:wait") == before + 1
    finally:
        await client.aclose()


@pytest.mark.timeout(30)
async def test_acks_wait_only_when_replicated(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscription's ack flushes end with WAIT only under REDIS_DURABILITY=replicated."""
    from core_bus.consume.subscription import subscription

    _sentinel_env(sentinels, monkeypatch)

    async def handled_with_acks(stream: str) -> int:
        client = connect()
        seen: list[Any] = []

        async def handler(env: Envelope) -> None:
            seen.append(env.content)

        try:
            for i in range(5):
                await client.xadd(stream, {"data": Envelope(role="user", content=i).to_json()})
            await client.config_resetstat()
            async with subscription(client, stream, handler, group="g", block_ms=100):
                await eventually(lambda: len(seen) == 5, 10)
                await eventually(lambda: _pending_zero(client, stream), 10, message="acks flushed")
            return await _wait_calls(client)
        finally:
            await client.aclose()

    assert await handled_with_acks("sentinel:acks:none") == 0
    monkeypatch.setenv("REDIS_DURABILITY", "replicated")
    from core_bus.settings import get_settings

    get_settings.cache_clear()
    assert await handled_with_acks("sentinel:acks:replicated") >= 1


@pytest.mark.timeout(30)
async def test_too_few_replicas_leave_acks_and_dead_letters_standing(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicated, asking for 2 replicas of a 1-replica deployment: the handled entry is
    acked anyway and ``ack_replication_short`` says so with the counts; the poison entry
    is dead-lettered (and acked) and ``dead_letter_replication_short`` is logged."""
    from structlog.testing import capture_logs

    from core_bus.consume.subscription import subscription
    from core_bus.settings import get_settings

    _sentinel_env(sentinels, monkeypatch)
    monkeypatch.setenv("REDIS_DURABILITY", "replicated")
    monkeypatch.setenv("REDIS_REPLICAS_TO_WAIT", "2")
    monkeypatch.setenv("REDIS_WAIT_TIMEOUT", "20")
    get_settings.cache_clear()
    stream, dlq = "sentinel:short", "sentinel:short:dlq"

    async def handler(env: Envelope) -> None:
        if env.content == "poison":
            raise RuntimeError("poison")

    client = connect()
    try:
        for content in ("fine", "poison"):
            await client.xadd(stream, {"data": Envelope(role="user", content=content).to_json()})
        with capture_logs() as logs:
            async with subscription(
                client, stream, handler, group="g", block_ms=100, max_deliveries=1, dlq_stream=dlq
            ):
                await eventually(lambda: _pending_zero(client, stream), 10, message="acked")
                await eventually(lambda: client.xlen(dlq), 10, message="dead-lettered")
        events = {e["event"]: e for e in logs}
        assert events["ack_replication_short"]["acked_replicas"] == 1
        assert events["ack_replication_short"]["wanted_replicas"] == 2
        assert "dead_letter_replication_short" in events
    finally:
        await client.aclose()


async def _pending_zero(client: Any, stream: str) -> bool:
    summary = await client.xpending(stream, "g")
    return int(summary["pending"]) == 0


# -- a fleet across failovers --------------------------------------------------------

HANDLER = """
import os


async def handle(env, redis):
    with open(os.environ["SEEN_FILE"], "a") as out:
        out.write(f"{env.content}\\n")
"""

FLEET = """
[supervisor]
name = "sentinel"
sweep_interval = "1s"
stop_timeout = "5s"
[redis]
# sentinel mode: the URL gives only credentials and db (port 1: nothing may use its host)
url = "redis://127.0.0.1:1/0"
mode = "sentinel"
sentinels = {sentinels}
master_name = "{master}"
durability = "{durability}"
wait_timeout = "500ms"
[http]
enabled = true
listen = "127.0.0.1:0"
[[agents]]
name = "sent"
handler = "sent_agent:handle"
replicas = 2
concurrency = 8
count = 20
claim_idle = "3s"
env = {{ SEEN_FILE = "{seen}" }}
"""

STREAM = "AG1:agent:sent:inbox"
RATE = 150  # envelopes per second


class Publisher:
    """Publishes numbered envelopes at RATE; a number counts as confirmed once a
    publish of it returned (retried on transient errors and ReplicationTimeout)."""

    def __init__(self, durability: str) -> None:
        self.durability = durability
        self.confirmed: set[int] = set()
        self.errors = 0
        self.stop = anyio.Event()

    async def run(self) -> None:
        client = connect()
        number = 0
        try:
            while not self.stop.is_set():
                env = Envelope(role="user", content=number)
                try:
                    with anyio.fail_after(3):
                        await publish_envelope(client, STREAM, env, durability=self.durability)
                except (ReplicationTimeout, TimeoutError) as exc:
                    self.errors += 1
                    del exc
                    continue
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self.errors += 1
                    await anyio.sleep(0.05)
                    continue
                self.confirmed.add(number)
                number += 1
                await anyio.sleep(1 / RATE)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()


class ReadyzWatch:
    """/readyz polled every 50 ms; remembers every status seen."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: list[tuple[float, int]] = []

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(self.base + "/readyz") as resp:
                        self.statuses.append((time.monotonic(), resp.status))
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.05)

    def seen_since(self, since: float) -> set[int]:
        return {status for at, status in self.statuses if at >= since}

    def last(self) -> int | None:
        return self.statuses[-1][1] if self.statuses else None


def _seen(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split() if line]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durability", ["replicated", "none"])
async def test_fleet_keeps_processing_across_failover_and_master_sigkill(
    sentinels: SentinelSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: str,
) -> None:
    """A fleet in sentinel mode under steady load: ``SENTINEL FAILOVER``, then SIGKILL of
    the new master. The same worker pids keep processing (no restart), /readyz is 503
    while the master is dead and 200 after, and every confirmed publish is processed —
    with ``replicated`` none may be lost; without it the loss is printed (async
    replication may drop acknowledged XADDs on a SIGKILL failover)."""
    _sentinel_env(sentinels, monkeypatch)
    seen_file = tmp_path / "seen.txt"
    (tmp_path / "sent_agent.py").write_text(HANDLER)
    toml = FLEET.format(
        sentinels=str(sentinels.addresses).replace("'", '"'),
        master=sentinels.master_name,
        durability=durability,
        seen=seen_file,
    )
    fleet = FleetProcess(tmp_path, toml)
    try:
        base = fleet.wait_listening()
        eventually_sync(lambda: fleet.events("fleet ready"), 30, message="fleet ready")
        pids = fleet.worker_pids()
        assert len(pids) == 2
        async with aiohttp.ClientSession() as session, session.get(base + "/status") as resp:
            status = await resp.json()  # names the sentinels, not the unused url host
        assert status["redis_mode"] == "sentinel", status
        assert status["redis"].startswith(f"sentinel master '{sentinels.master_name}' via ")
        publisher = Publisher(durability)
        readyz = ReadyzWatch(base)
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher.run)
            tg.start_soon(readyz.run)
            await eventually(lambda: len(_seen(seen_file)) >= 100, 15, message="first 100")

            await anyio.to_thread.run_sync(sentinels.failover)
            mark = len(publisher.confirmed)
            await eventually(
                lambda: max(_seen(seen_file), default=0) > mark + 50, 20, message="after failover"
            )

            killed_at = time.monotonic()
            await anyio.to_thread.run_sync(sentinels.kill_master)
            mark = len(publisher.confirmed)
            await eventually(
                lambda: max(_seen(seen_file), default=0) > mark + 50, 30, message="after kill"
            )
            await eventually(lambda: readyz.last() == 200, 10, message="/readyz 200")
            publisher.stop.set()
            confirmed = set(publisher.confirmed)
            tg.cancel_scope.cancel()

        assert 503 in readyz.seen_since(killed_at), "/readyz never reported the dead master"
        try:
            await eventually(
                lambda: confirmed <= set(_seen(seen_file)),
                30 if durability == "replicated" else 10,
                message="every confirmed publish processed",
            )
        except AssertionError:
            if durability == "replicated":
                raise
        seen = _seen(seen_file)
        lost = confirmed - set(seen)
        duplicates = len(seen) - len(set(seen))
        print(
            f"\nsentinel failover + SIGKILL, durability={durability}: {len(confirmed)} "
            f"confirmed, {len(lost)} lost, {duplicates} duplicates, "
            f"{publisher.errors} publish retries"
        )
        if durability == "replicated":
            assert not lost
        assert fleet.worker_pids() == pids, "workers were restarted"
        assert not fleet.find("worker exited")
    finally:
        fleet.close()
