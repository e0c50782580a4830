"""Every Redis key the bus and the supervisor use is built here, nowhere else.

The prototype's methods keep their exact output so existing deployments and
agents address the same streams.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_NAMESPACE = "AG1"


def shard_for(key: str | bytes, shards: int) -> int:
    """Return the shard index in ``range(shards)`` for a routing key.

    Stable across processes, hosts, Python versions and releases: the first 8
    bytes of the key's SHA-1 digest, read big-endian, modulo ``shards``
    (Python's ``hash()`` is salted per process and must never be used here).
    """
    if shards < 1:
        raise ValueError("shards must be >= 1")
    raw = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha1(raw).digest()[:8], "big") % shards


def default_consumer_name() -> str:
    """The library's consumer name when none is given: ``host:pid:random``.

    Unique per incarnation and says where it runs; it never contains ``/``, so
    it cannot be mistaken for a supervisor's :class:`WorkerConsumer`.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class WorkerConsumer:
    """The consumer name a supervisor hands a worker: ``supervisor/agent/slot/incarnation``.

    Host, supervisor and agent names never contain ``/`` (a host name cannot,
    and fleet.toml names are ``[A-Za-z0-9_.-]``), so these names never collide
    with :func:`default_consumer_name` nor with another supervisor's. The
    supervisor also records each one it hands out in its registry
    (:meth:`StreamKeyBuilder.supervisor_registry`) and only ever cleans up or
    reclaims from names found there.
    """

    supervisor: str
    agent: str
    slot: int
    incarnation: str

    def __str__(self) -> str:
        return f"{self.supervisor}/{self.agent}/{self.slot}/{self.incarnation}"

    @classmethod
    def parse(cls, name: str) -> WorkerConsumer | None:
        """The parts of a supervisor-made name; None for any other consumer name."""
        parts = name.split("/")
        if len(parts) != 4 or not parts[2].isdigit() or not all(parts):
            return None
        return cls(parts[0], parts[1], int(parts[2]), parts[3])


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, when it has one (``{...}``, non-empty).

    Redis' rule: the text between the first ``{`` and the first ``}`` after it,
    if that text is not empty; otherwise the whole key is hashed (``None`` here).
    """
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def slot_tag(key: str) -> str:
    """What decides ``key``'s slot: its hash tag, or the whole key."""
    tag = hash_tag(key)
    return key if tag is None else tag


def dead_letter_seen(dlq_stream: str) -> str:
    """Sorted set of ``"<stream> <id>"`` already dead-lettered to ``dlq_stream`` by the
    non-atomic path (source stream in another cluster slot), scored by when; in the
    dead-letter stream's slot, so a write repeated after a crash between its XADD and
    the source's XACK is recognised and skipped."""
    if hash_tag(dlq_stream) is not None:
        return f"{dlq_stream}:seen"
    return f"{{{dlq_stream}}}:seen"


class StreamKeyBuilder:
    """Builds namespaced stream and key names (``AG1:agent:{id}:inbox`` ...).

    ``cluster=True`` (Redis Cluster) puts hash tags in the keys one multi-key
    operation touches together, so they share a slot: an agent's inbox and
    outbox are tagged with the agent (``AG1:agent:{echo}:inbox``), the keys of
    a consumer group (dead letters, suspects, ordered members) with the group
    (``AG1:dlq:{echo}``; a group defaults to its agent's name, so they land in
    the inbox's slot), each shard of a base stream gets its own tag
    (``{echo:3}``) so shards spread across slots, and a shard's lease follows
    its shard. Without ``cluster`` every name is the prototype's, byte for byte
    (docs/ARCHITECTURE.md, "Redis Cluster key layout").
    """

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, *, cluster: bool = False) -> None:
        self.ns = namespace
        self.cluster = cluster

    def _tag(self, name: str) -> str:
        """``{name}`` in cluster mode (an empty name stays empty: it builds prefixes)."""
        return f"{{{name}}}" if self.cluster and name else name

    @property
    def _fleet(self) -> str:
        """Prefix of the supervisors' bookkeeping (membership, registries, locks,
        command streams): ``AG1:fleet``, or ``{AG1:fleet}`` on a cluster so the
        membership scripts (lease + members hash + departed stream, registry +
        lease) touch one slot. Low traffic: one slot is plenty."""
        return f"{{{self.ns}:fleet}}" if self.cluster else f"{self.ns}:fleet"

    # -- prototype keys (output must not change) --------------------------------
    def flow_input(self, flow_id: str) -> str:
        return f"{self.ns}:flow:{flow_id}:input"

    def flow_output(self, flow_id: str) -> str:
        return f"{self.ns}:flow:{flow_id}:output"

    def agent_inbox(self, agent_id: str) -> str:
        return f"{self.ns}:agent:{self._tag(agent_id)}:inbox"

    def agent_outbox(self, agent_id: str) -> str:
        return f"{self.ns}:agent:{self._tag(agent_id)}:outbox"

    def user_inbox(self, user_id: str) -> str:
        return f"{self.ns}:user:{user_id}:inbox"

    def session_stream(self, session_code: str) -> str:
        return f"{self.ns}:session:{session_code}:stream"

    def tg_register(self) -> str:
        """Where agents register with the Telegram edge handler (``AG1:tg:register``)."""
        return f"{self.ns}:tg:register"

    def edge_register(self, platform: str) -> str:
        return f"{self.ns}:edge:{platform}:register"

    def edge_stream(self, platform: str, target: str) -> str:
        return f"{self.ns}:edge:{platform}:{target}:stream"

    def edge_response(self, platform: str, target: str) -> str:
        return f"{self.ns}:edge:{platform}:{target}:response"

    def edge_inbox(self, service_name: str, instance: str = "main") -> str:
        return f"{self.ns}:edge:{service_name}:{instance}:inbox"

    def edge_status(self, service_name: str, instance: str = "main") -> str:
        return f"{self.ns}:edge:{service_name}:{instance}:status"

    def agent_user_inbox(self, agent_id: str, user_id: str) -> str:
        return f"{self.ns}:agent:{self._tag(agent_id)}:{user_id}:inbox"

    def sandboxed_agent_inbox(self, agent_name: str, sandbox_id: str) -> str:
        return f"{self.ns}:sandbox:{sandbox_id}:agent:{agent_name}:inbox"

    def a2a_register(self) -> str:
        return f"{self.ns}:a2a:register"

    def a2a_inbox(self, agent_name: str) -> str:
        return f"{self.ns}:a2a:agent:{agent_name}:inbox"

    def a2a_stream(self, agent_name: str, task_id: str) -> str:
        return f"{self.ns}:a2a:stream:{agent_name}:{task_id}"

    def a2a_response(self, agent_name: str, task_id: str) -> str:
        return f"{self.ns}:a2a:response:{agent_name}:{task_id}"

    def billing_ledger(self, agent_id: str | None = None) -> str:
        """Per-agent ledger (``AG1:billing:{id}:ledger``), or the system-wide one."""
        if agent_id is None:
            return f"{self.ns}:billing:ledger"
        return f"{self.ns}:billing:{agent_id}:ledger"

    def memory_key(self, cassette_id: str) -> str:
        return f"{self.ns}:memory:{cassette_id}:write"

    def ans_key(self, agent_id: str) -> str:
        return f"ANS:{agent_id}"  # deliberately not namespaced (prototype behaviour)

    # -- keys added by AG1 Fleet -------------------------------------------------
    def dead_letter(self, group: str) -> str:
        """Dead-letter stream of one consumer group."""
        return f"{self.ns}:dlq:{self._tag(group)}"

    def suspects(self, group: str) -> str:
        """Hash of crash suspects: ``"<id> <stream>"`` -> "" or the isolating consumer."""
        return f"{self.ns}:suspects:{self._tag(group)}"

    def dead_letter_pattern(self) -> str:
        return f"{self.ns}:dlq:*"

    def shard_stream(self, base_stream: str, index: int) -> str:
        """Stream of shard ``index`` of ``base_stream`` (``AG1:agent:x:inbox:shard:3``)."""
        if not self.cluster:
            return f"{base_stream}:shard:{index}"
        tag = hash_tag(base_stream)
        if tag is None:  # a user's untagged stream: the shard's tag names base and index
            return f"{base_stream}:shard:{{{base_stream}:{index}}}"
        tagged = base_stream.replace(f"{{{tag}}}", f"{{{tag}:{index}}}", 1)
        return f"{tagged}:shard:{index}"

    def shard_streams(self, base_stream: str, shards: int) -> list[str]:
        return [self.shard_stream(base_stream, i) for i in range(shards)]

    def route(self, base_stream: str, routing_key: str | bytes, shards: int) -> str:
        """The shard stream a publisher must use for ``routing_key``."""
        return self.shard_stream(base_stream, shard_for(routing_key, shards))

    def discovery_stream(self) -> str:
        """Notices of newly created streams, written on a stream's first publish."""
        return f"{self.ns}:bus:streams"

    def rpc_reply_stream(self, token: str) -> str:
        """Private reply stream of one RPC caller."""
        return f"{self.ns}:rpc:reply:{token}"

    def shard_lease(self, group: str, base_stream: str, index: int) -> str:
        """Lease naming the consumer that owns one ordered shard."""
        if self.cluster:  # in the shard's slot: the fenced ack checks it with the XACK
            tag = slot_tag(self.shard_stream(base_stream, index))
            return f"{self.ns}:fleet:lease:{{{tag}}}:{group}:{base_stream}:{index}"
        return f"{self.ns}:fleet:lease:{group}:{base_stream}:{index}"

    def ordered_members(self, group: str) -> str:
        """Live members of an ordered-shard group (scored by their last heartbeat)."""
        return f"{self.ns}:fleet:ordered-members:{self._tag(group)}"

    def supervisor_registry(self, supervisor_name: str) -> str:
        """Hash of the consumer names a supervisor handed out (name -> agent), across runs."""
        return f"{self._fleet}:consumers:{supervisor_name}"

    def supervisor_groups(self, supervisor_name: str) -> str:
        """Hash of the consumer groups a supervisor's plan reads (group -> agent); a group
        of the namespace in no supervisor's hash is an orphan (``ag1-bus groups``)."""
        return f"{self._fleet}:groups:{supervisor_name}"

    def supervisor_groups_pattern(self) -> str:
        return f"{self._fleet}:groups:*"

    def supervisor_lock(self, name: str) -> str:
        """Short-lived lock (always with a TTL) for supervisor bookkeeping."""
        return f"{self._fleet}:lock:{name}"

    # -- fleet membership (supervisor.membership) ------------------------------------
    def fleet_members(self) -> str:
        """Hash of every supervisor of the fleet: name -> JSON record, rewritten each renewal.

        A dead member stays here until a live one has reclaimed its consumers."""
        return f"{self._fleet}:members"

    def fleet_lease(self, supervisor_name: str) -> str:
        """A supervisor's membership lease: a string holding its incarnation, ``PX lease_ttl``.

        ``fleet:member:`` (not ``fleet:lease:``, which holds ordered shard leases)."""
        return f"{self._fleet}:member:{supervisor_name}"

    def fleet_departed(self) -> str:
        """Stream of members that left or expired, and what was reclaimed from them."""
        return f"{self._fleet}:departed"

    # -- fleet-wide control (supervisor.fleetctl) --------------------------------------
    def fleet_commands(self) -> str:
        """Stream of control commands to supervisors (``target`` names one), MAXLEN ~1000."""
        return f"{self._fleet}:commands"

    def fleet_command_acks(self) -> str:
        """Stream of the answers: one entry per command a supervisor ran (``cmd`` = its id)."""
        return f"{self._fleet}:command-acks"


#: The environment variable naming the connection mode (``standalone`` | ``sentinel`` |
#: ``cluster``); the supervisor hands it to every worker.
MODE_ENV = "REDIS_MODE"


def cluster_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``REDIS_MODE`` says ``cluster`` (keys then carry hash tags)."""
    env = os.environ if environ is None else environ
    return env.get(MODE_ENV, "").strip().lower() == "cluster"


DEFAULT_KEYS = StreamKeyBuilder()
