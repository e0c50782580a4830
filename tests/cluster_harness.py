"""A real Redis Cluster on loopback for tests and benches: 3 masters (optionally 3 replicas).

Nodes are plain ``redis-server --cluster-enabled yes`` processes on free ports whose
cluster-bus port (``port + 10000``) is free too; ``redis-cli --cluster create`` assigns
the slots, then we wait until every node reports ``cluster_state:ok`` and agrees on the
slot map. Everything is killed by pid and the data directories removed by ``close()``.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.redis.server import (
    RedisServerError,
    RedisServerProcess,
    find_redis_server,
    port_free,
)

_handed_out: set[int] = set()



def pick_cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too, never handed out twice."""
    for _ in range(1000):
        port = random.randint(21000, 50000)
        if port in _handed_out or (port + 10000) in _handed_out:
            continue
        if port_free(port) and port_free(port + 10000):
            _handed_out.update((port, port + 10000))
            return port
    raise RedisServerError("no free cluster port pair found")


def _cli(binary: Path) -> str:
    """redis-cli (or valkey-cli) next to the server binary, else from PATH."""
    for name in ("redis-cli", "valkey-cli"):
        sibling = binary.parent / name
        if sibling.exists():
            return str(sibling)
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError("redis-cli not found")


def _info(cli: str, port: int, *command: str) -> str:
    result = subprocess.run(
        [cli, "-p", str(port), *command], capture_output=True, text=True, timeout=5, check=False
    )
    return result.stdout


@dataclass
class RedisClusterHarness:
    """Start with :meth:`start`, stop with :meth:`close`. ``url`` names one seed node."""

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ag1-cluster-")))
    nodes: list[RedisServerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisClusterHarness:
        binary, _version = find_redis_server()
        cli = _cli(binary)
        total = self.masters * (1 + self.replicas)
        try:
            for index in range(total):
                port = pick_cluster_port()
                node = RedisServerProcess(
                    data_dir=self.root / f"node-{index}",
                    port=port,
                    appendonly=False,
                    binary=binary,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(self.root / f"node-{index}" / "nodes.conf"),
                        "--cluster-node-timeout",
                        str(self.node_timeout_ms),
                        "--cluster-replica-validity-factor",
                        "0",
                        "--cluster-require-full-coverage",
                        "no",
                    ],
                )
                node.start()
                self.nodes.append(node)
            create = [cli, "--cluster", "create"]
            create += [f"127.0.0.1:{p}" for p in self.ports]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            result = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
            if result.returncode != 0:
                raise RedisServerError(f"cluster create failed: {result.stdout[-500:]}")
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0, ports: list[int] | None = None) -> None:
        """Until every listed node (default: all alive) says cluster_state:ok, they agree
        on the masters and every replica's link to its master is up (synced)."""
        binary = self.nodes[0].binary
        assert binary is not None
        cli = _cli(binary)
        deadline = time.monotonic() + timeout
        wanted = ports or [n.port for n in self.nodes if n.process and n.process.poll() is None]
        while True:
            states = [_info(cli, p, "cluster", "info") for p in wanted]
            slot_views = {_info(cli, p, "cluster", "shards").count("master") for p in wanted}
            replicas = [_info(cli, p, "info", "replication") for p in wanted]
            synced = all("role:master" in r or "master_link_status:up" in r for r in replicas)
            if all("cluster_state:ok" in s for s in states) and len(slot_views) == 1 and synced:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(f"cluster not ok after {timeout}s: {states}")
            time.sleep(0.05)

    def node_for_port(self, port: int) -> RedisServerProcess:
        return next(n for n in self.nodes if n.port == port)

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (asked of any live node)."""
        binary = self.nodes[0].binary
        assert binary is not None
        cli = _cli(binary)
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            out = _info(cli, node.port, "cluster", "nodes")
            if out:
                ports = []
                for line in out.splitlines():
                    parts = line.split()
                    if len(parts) > 2 and "master" in parts[2] and "fail" not in parts[2]:
                        ports.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
                return ports
        return []

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
