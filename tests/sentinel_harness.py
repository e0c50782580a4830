"""A real Redis Sentinel deployment on free loopback ports: 1 master, 1 replica, 3 sentinels.

:class:`SentinelSet` starts ``redis-server`` twice (the second with
``--replicaof``) and ``redis-server <conf> --sentinel`` three times with a low
``down-after-milliseconds`` (1 s) so a SIGKILLed master is replaced in a few
seconds. Everything is killed by pid in :meth:`SentinelSet.close`; the data
and config live under the directory the caller passes (pytest's tmp dirs,
removed by pytest). Helpers wait on conditions with deadlines, never sleep:
:meth:`failover` (``SENTINEL FAILOVER``) and :meth:`kill_master` (SIGKILL,
then the killed server is restarted and rejoins as a replica) return once
the sentinels agree on the new master and it has a synced replica again, so
the next failover can follow at once. Also used by ``bench/redis_failover.py``.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from supervisor.redis.server import RedisServerProcess, find_redis_server, pick_free_port

MASTER_NAME = "ag1"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000
#: A (re)joining replica syncs at once (the default waits 5 s for more replicas).
FAST_SYNC = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


@dataclass
class SentinelProcess:
    """One ``redis-server --sentinel`` with its own (rewritable) config file."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self, binary: Path, master_port: int) -> SentinelProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.process = subprocess.Popen(
            [str(binary), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (redis.RedisError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")


def _promotable(replica: dict[str, Any]) -> bool:
    """Up and connected in a sentinel's view. (Its ``master-link-status`` lags up to
    10 s, the sentinels' INFO period for replicas: :meth:`SentinelSet.failover`
    retries a NOGOODSLAVE refusal instead of waiting for it.)"""
    flags = str(replica.get("flags", ""))
    return not replica["is_sdown"] and "disconnected" not in flags


@dataclass
class SentinelSet:
    """Master + replica + 3 sentinels; ``servers`` by port (the roles move on failover)."""

    dir: Path
    servers: dict[int, RedisServerProcess] = field(default_factory=dict)
    sentinels: list[SentinelProcess] = field(default_factory=list)
    master_name: str = MASTER_NAME

    def start(self, timeout: float = 20.0) -> SentinelSet:
        binary, _version = find_redis_server()
        master = RedisServerProcess(
            self.dir / "redis-a", binary=binary, extra_args=list(FAST_SYNC)
        ).start()
        self.servers[master.port] = master
        replica = RedisServerProcess(
            self.dir / "redis-b",
            binary=binary,
            extra_args=[*FAST_SYNC, "--replicaof", "127.0.0.1", str(master.port)],
        ).start()
        self.servers[replica.port] = replica
        for index in range(3):
            sentinel = SentinelProcess(self.dir / f"sentinel-{index}", pick_free_port())
            self.sentinels.append(sentinel.start(binary, master.port))
        self.wait_settled(timeout)
        return self

    # -- what the sentinels say -------------------------------------------------------
    @property
    def addresses(self) -> list[str]:
        """``["127.0.0.1:port", ...]`` of the sentinels (fleet.toml / REDIS_SENTINELS)."""
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def master_port(self) -> int:
        """The master's port according to the first sentinel that answers."""
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                try:
                    address = client.sentinel_get_master_addr_by_name(self.master_name)
                except redis.RedisError:
                    continue
            if address:
                return int(address[1])
        raise AssertionError("no sentinel answers")

    def _agreed(self) -> int | None:
        """The master's port when every sentinel names the same one, else None."""
        named = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                address = client.sentinel_get_master_addr_by_name(self.master_name)
            named.add(int(address[1]) if address else None)
        return named.pop() if len(named) == 1 else None

    def replica_port(self) -> int:
        return next(p for p in self.servers if p != self.master_port())

    def master_url(self) -> str:
        return f"redis://127.0.0.1:{self.master_port()}/0"

    def _unsettled(self) -> tuple[int | None, str | None]:
        """The master every sentinel names and why the deployment is not settled on
        it yet (``None``: it is).

        Settled: every sentinel names the same master, not down, knows its 2 peers
        and a replica it could promote; that master has the replica online."""
        named: set[int] = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(self.master_name)
                replicas = client.sentinel_slaves(self.master_name)
            name = f"sentinel {sentinel.port}"
            named.add(int(state["port"]))
            if "s_down" in str(state.get("flags", "")):
                return None, f"{name} sees master {state['port']} down"
            if int(state["num-other-sentinels"]) < 2:
                return None, f"{name} knows {state['num-other-sentinels']} other sentinels"
            if not any(_promotable(r) for r in replicas):
                return None, f"{name} has no promotable replica: {replicas!r}"
        if len(named) != 1:
            return None, f"the sentinels name different masters: {sorted(named)}"
        master_port = named.pop()
        with redis.Redis(port=master_port, socket_timeout=1, decode_responses=True) as master:
            info = master.info("replication")
        slave = info.get("slave0", {})
        if info.get("role") != "master" or not isinstance(slave, dict):
            return master_port, f"master {master_port}: role {info.get('role')}, no replica"
        if slave.get("state") != "online":
            return master_port, f"master {master_port}: replica state {slave.get('state')}"
        return master_port, None

    def wait_settled(self, timeout: float = 20.0) -> int:
        """Until the deployment settled (see :meth:`_unsettled`); returns the master's port.

        On a loaded machine a sentinel may flag a just-promoted master down and fail
        over once more (seen with ``down-after-milliseconds 1000``): settling follows
        whichever master the sentinels end up agreeing on."""
        last: list[Any] = [None, "not asked yet"]

        def settled() -> bool:
            last[:] = self._unsettled()
            return last[1] is None

        try:
            _wait(settled, timeout, "the sentinels to settle")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {last[1]}") from None
        return int(last[0])

    # -- failovers --------------------------------------------------------------------
    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``; returns the new master's port once settled."""
        old = self.master_port()

        def start() -> bool:
            with self.sentinels[0].client() as client:
                try:
                    return bool(client.execute_command("SENTINEL", "FAILOVER", self.master_name))
                except redis.ResponseError as exc:  # NOGOODSLAVE/INPROG: a view still settling
                    if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                        return False
                    raise

        _wait(start, timeout, "SENTINEL FAILOVER accepted")
        new = int(_wait(lambda: (p := self._agreed()) != old and p, timeout, "a new master"))
        self._rejoin(old, new)  # only now: the new master is promoted everywhere
        return self.wait_settled(timeout)

    def _rejoin(self, port: int, master: int) -> None:
        """Point a server that still says "master" at the real one now: a Sentinel
        converts a former master only after 8 s (4 hello periods), and until then
        the new master has no replica (WAIT 1 would time out)."""
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
            if client.info("replication").get("role") == "master":
                client.replicaof("127.0.0.1", master)

    def kill_master(self, timeout: float = 30.0, restart: bool = True) -> int:
        """SIGKILL the master; returns the promoted replica's port. With ``restart`` the
        killed server comes back (same port and data) and is waited for as its replica."""
        old = self.master_port()
        self.servers[old].kill()
        # Every sentinel must have switched before the old server answers again: one
        # that still names it would see its "master" back and stay behind (seen).
        new = int(
            _wait(lambda: (p := self._agreed()) != old and p, timeout, "every sentinel switching")
        )
        if restart:
            self.restart(old, replica_of=new)
            return self.wait_settled(timeout)
        return new

    def restart(self, port: int, replica_of: int) -> None:
        """Start the (killed) server on ``port`` again as a replica of ``replica_of``
        (what the sentinels would make of it, 8 s sooner)."""
        server = self.servers[port]
        server.extra_args = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(replica_of)]
        server.start()

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
        for server in self.servers.values():
            server.kill()
