"""Redis Cluster key layout and script rules, without a server.

Standalone names stay the prototype's; in cluster mode every multi-key operation's
keys share a slot; every Lua script takes its keys in KEYS (never builds a key name);
nothing sends KEYS.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import core_bus
import supervisor
from core_bus.keys import StreamKeyBuilder, dead_letter_seen, hash_tag, slot_tag
from core_bus.streams.slots import by_slot, slot_of

ROOT = Path(__file__).resolve().parent.parent
KS = StreamKeyBuilder()
KC = StreamKeyBuilder(cluster=True)


def test_standalone_fleet_keys_are_unchanged() -> None:
    """The keys AG1 Fleet added keep their names without ``cluster`` (byte for byte)."""
    base = KS.agent_inbox("a")
    assert KS.dead_letter("g") == "AG1:dlq:g"
    assert KS.suspects("g") == "AG1:suspects:g"
    assert KS.shard_stream(base, 3) == "AG1:agent:a:inbox:shard:3"
    assert KS.shard_lease("g", base, 3) == "AG1:fleet:lease:g:AG1:agent:a:inbox:3"
    assert KS.ordered_members("g") == "AG1:fleet:ordered-members:g"
    assert KS.agent_outbox("a") == "AG1:agent:a:outbox"
    assert KS.agent_user_inbox("a", "u") == "AG1:agent:a:u:inbox"
    assert StreamKeyBuilder(cluster=False).agent_inbox("a") == base == "AG1:agent:a:inbox"


def test_hash_tag_follows_redis_rules() -> None:
    assert hash_tag("AG1:agent:{echo}:inbox") == "echo"
    assert hash_tag("a{}b{c}") is None  # an empty first tag: the whole key is hashed
    assert hash_tag("{a}{b}") == "a"
    assert hash_tag("plain") is None and slot_tag("plain") == "plain"
    assert slot_of("AG1:agent:{echo}:inbox") == slot_of("echo")


def test_an_agents_keys_share_one_slot_in_cluster_mode() -> None:
    """Inbox, outbox, dead letters (and their seen set), suspects and ordered members of
    agent ``echo`` (group ``echo``) hash to one slot: dead-letter + ack is one MULTI."""
    keys = [
        KC.agent_inbox("echo"),
        KC.agent_outbox("echo"),
        KC.dead_letter("echo"),
        dead_letter_seen(KC.dead_letter("echo")),
        KC.suspects("echo"),
        KC.ordered_members("echo"),
    ]
    assert keys[0] == "AG1:agent:{echo}:inbox" and keys[2] == "AG1:dlq:{echo}"
    assert len({slot_of(k) for k in keys}) == 1
    assert KC.dead_letter("") == KS.dead_letter("")  # prefixes stay untagged


def test_shards_spread_across_slots_and_leases_follow_their_shard() -> None:
    """Each shard has its own tag (``{echo:3}``), so shards spread over slots; a shard's
    lease is in its shard's slot (the fenced ack checks it with the XACK). The same holds
    for a user's untagged base stream."""
    for base in (KC.agent_inbox("echo"), "orders"):
        shards = KC.shard_streams(base, 6)
        assert len({slot_of(s) for s in shards}) == 6
        for i, shard in enumerate(shards):
            assert slot_of(KC.shard_lease("echo", base, i)) == slot_of(shard)
            assert shard.endswith(f":{i}") or shard.endswith(f":{i}}}")
    assert KC.shard_stream(KC.agent_inbox("echo"), 3) == "AG1:agent:{echo:3}:inbox:shard:3"
    assert KC.shard_stream("orders", 3) == "orders:shard:{orders:3}"
    assert KC.route(KC.agent_inbox("echo"), "k", 6) in KC.shard_streams(KC.agent_inbox("echo"), 6)


def test_dead_letter_seen_set_is_in_its_dead_letter_streams_slot() -> None:
    for dlq in ("AG1:dlq:{echo}", "custom-dlq", "x:{t}:y"):
        assert slot_of(dead_letter_seen(dlq)) == slot_of(dlq)


def test_by_slot_keeps_first_seen_order() -> None:
    streams = [KC.agent_inbox("a"), KC.agent_outbox("a"), "x", KC.agent_inbox("b")]
    groups = by_slot(streams)
    assert groups[0] == [KC.agent_inbox("a"), KC.agent_outbox("a")]
    assert sum(len(g) for g in groups) == 4


def test_fleet_config_in_cluster_mode_uses_tagged_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REDIS_MODE=cluster: an agent's default inbox, dead letters and shard streams carry
    hash tags; its workers are told REDIS_MODE=cluster."""
    from supervisor.config.load import load_config
    from supervisor.runtime.worker_env import FleetContext, worker_environment

    monkeypatch.setenv("REDIS_MODE", "cluster")
    (tmp_path / "fleet.toml").write_text(
        '[supervisor]\nname = "t"\n[redis]\nurl = "redis://127.0.0.1:1/0"\n'
        '[[agents]]\nname = "echo"\nhandler = "m:h"\nshards = 3\n'
    )
    config = load_config(tmp_path / "fleet.toml", check_imports=False)
    echo = config.agents[0]
    assert echo.streams == ["AG1:agent:{echo}:inbox"]
    assert echo.dlq_stream == "AG1:dlq:{echo}"
    assert len({slot_of(s) for s in echo.read_streams}) == 3
    context = FleetContext({}, "redis://127.0.0.1:1/0", "AG1", "/tmp/x", tmp_path)
    assert worker_environment(echo, context, "echo/0", "c")["REDIS_MODE"] == "cluster"
    monkeypatch.delenv("REDIS_MODE")
    plain = load_config(tmp_path / "fleet.toml", check_imports=False).agents[0]
    assert plain.streams == ["AG1:agent:echo:inbox"] and plain.dlq_stream == "AG1:dlq:echo"
    env = worker_environment(plain, context, "echo/0", "c")
    assert "REDIS_MODE" not in env


# -- Lua scripts: keys only from KEYS ------------------------------------------------


def _scripts() -> dict[str, str]:
    """Every Lua script constant of core_bus and supervisor (module-level str holding
    ``redis.call``), by ``module.NAME``."""
    found: dict[str, str] = {}
    for package in (core_bus, supervisor):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(("__main__", "supervisor.worker")):
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, str) and "redis.call" in value:
                    found[f"{info.name}.{name}"] = value
    return found


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a call's argument text."""
    args, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    args.append(current.strip())
    return args


_NO_KEY = {"TIME"}
_SUBCOMMAND = {"XINFO", "XGROUP"}


def _key_args(args: list[str]) -> list[str]:
    command = args[0].strip("'\"").upper()
    if command in _NO_KEY:
        return []
    if command in _SUBCOMMAND:
        return [args[2]]
    if command in ("XREADGROUP", "XREAD"):
        at = [a.strip("'\"").upper() for a in args].index("STREAMS")
        return [args[at + 1]]
    return [args[1]]


def test_every_lua_script_takes_its_keys_from_keys() -> None:
    """No script builds a key name: each command's key argument is ``KEYS[n]`` (or a local
    taken straight from KEYS), never a concatenation (``..``) or an ARGV value."""
    scripts = _scripts()
    assert len(scripts) >= 8, sorted(scripts)
    problems = []
    for where, script in scripts.items():
        loop_vars = set(re.findall(r"for\s+\w+\s*,\s*(\w+)\s+in\s+ipairs\(KEYS\)", script))
        loop_vars |= set(re.findall(r"local\s+(\w+)\s*=\s*KEYS\[.*\]\s*$", script, re.M))
        for match in re.finditer(r"redis\.call\(|pcall\(redis\.call,", script):
            args = _split_args(script[match.end() :])
            for key in _key_args(args):
                if ".." in key or not (re.fullmatch(r"KEYS\[\d+\]", key) or key in loop_vars):
                    problems.append(f"{where}: {args[0]} key {key!r}")
    assert not problems, problems


def test_no_keys_command_anywhere() -> None:
    """KEYS blocks a server and sees one cluster node only: SCAN (all primaries) instead."""
    pattern = re.compile(r"""\.keys\(\s*['"f]|execute_command\(\s*['"]KEYS['"]""")
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("core_bus", "supervisor")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert not offenders


def test_check_warns_what_an_untagged_stream_costs_in_cluster_mode(tmp_path: Path) -> None:
    """``ag1-fleet check`` in cluster mode: a stream (or pattern) outside the agent's slot
    gets one warning naming the split dead-letter path and the per-slot reads; a tagged
    stream none; standalone mode none."""
    from supervisor.config.load import load_config

    (tmp_path / "fleet.toml").write_text(
        '[supervisor]\nname = "t"\n[redis]\nurl = "redis://127.0.0.1:1/0"\n'
        '[[agents]]\nname = "echo"\nhandler = "m:h"\n'
        '[[agents]]\nname = "billing"\nhandler = "m:h"\n'
        'streams = ["payments", "AG1:agent:{billing}:inbox", "AG1:orders:*"]\n'
    )
    config = load_config(
        tmp_path / "fleet.toml", environ={"REDIS_MODE": "cluster"}, check_imports=False
    )
    cluster = [w for w in config.warnings if "Redis Cluster" in w]
    assert len(cluster) == 1 and "agents[1].streams" in cluster[0], config.warnings
    assert "'payments', 'AG1:orders:*'" in cluster[0] and "XADD then XACK" in cluster[0]
    assert "one connection per slot (2 slots)" in cluster[0]
    plain = load_config(tmp_path / "fleet.toml", environ={}, check_imports=False)
    assert not [w for w in plain.warnings if "Redis Cluster" in w]


def test_nogroup_and_transient_errors_recognised_in_cluster_pipeline_errors() -> None:
    """redis-py's cluster pipeline shows the server's reply as a tuple; NOGROUP (recreate
    the group) and READONLY (a failover: back off) must still be recognised."""
    from redis.exceptions import ResponseError

    from core_bus.streams.errors import is_nogroup, is_transient

    prefix = "Command # 1 (XPENDING s g - + 1000 c) of pipeline caused error: "
    assert is_nogroup(
        ResponseError(prefix + "(\"NOGROUP No such key 's' or consumer group 'g'\",)")
    )
    assert is_transient(ResponseError(prefix + "('READONLY You can't write against a replica.',)"))
    assert is_nogroup(ResponseError(prefix + "NOGROUP No such key"))
    assert not is_nogroup(ResponseError(prefix + "('ERR something else',)"))


def test_block_stays_below_a_cluster_clients_socket_timeout() -> None:
    """A RedisCluster has no connection_pool: its socket timeout still caps BLOCK."""
    from redis.asyncio.cluster import RedisCluster

    from core_bus.streams.blocking import blocking_ms

    client = RedisCluster(host="127.0.0.1", port=1, socket_timeout=1)
    assert blocking_ms(client, 2.0) == 500


def test_fleet_bookkeeping_keys_share_one_slot_on_a_cluster() -> None:
    """The membership scripts (lease + members hash + departed stream) and the
    reclaimer's fenced registry forget (registry + lease) each run in one slot;
    standalone names stay as they were."""
    fleet = [
        KC.fleet_members(),
        KC.fleet_lease("h1"),
        KC.fleet_departed(),
        KC.supervisor_registry("h1"),
        KC.supervisor_groups("h1"),
        KC.supervisor_lock("reclaim:h1:x:echo"),
        KC.fleet_commands(),
        KC.fleet_command_acks(),
    ]
    assert len({slot_of(key) for key in fleet}) == 1
    assert all(hash_tag(key) == "AG1:fleet" for key in fleet)
    assert KS.fleet_members() == "AG1:fleet:members"
    assert KS.fleet_lease("h1") == "AG1:fleet:member:h1"
    assert KS.supervisor_registry("h1") == "AG1:fleet:consumers:h1"
    assert KS.supervisor_groups_pattern() == "AG1:fleet:groups:*"
