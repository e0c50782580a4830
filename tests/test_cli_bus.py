"""``ag1-bus`` run as a user would: a subprocess with REDIS_URL in its environment."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder
from core_bus.publish import DATA_FIELD
from core_bus.streams.replies import entries_of
from supervisor.redis.server import pick_free_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KB = StreamKeyBuilder()
INBOX = KB.agent_inbox("cli")


@pytest.fixture
def bus(redis_url: str, python_exe: str, tmp_path: Path) -> Any:
    """Run ``python -m core_bus.tools.cli -q ARGS`` in ``tmp_path`` (-q: errors are the only
    stderr lines; the Redis line is tested in test_newcomer); returns the CompletedProcess."""

    def run(
        *args: str,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
        base["REDIS_URL"] = redis_url
        return subprocess.run(
            [python_exe, "-m", "core_bus.tools.cli", "-q", *args],
            capture_output=True,
            text=True,
            env={**base, **(env or {})},
            input=stdin if stdin is not None else "",
            cwd=cwd or tmp_path,
            timeout=30,
            check=False,
        )

    return run


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ag1-bus: ") and text in lines[0], lines


async def test_publish_one_json_file_and_text(redis: Any, bus: Any, tmp_path: Path) -> None:
    """publish writes one envelope per call (JSON, @file or --text content, role,
    reply-to) and prints its entry id."""
    proc = bus("publish", INBOX, "--content", '{"a": 1}', "--role", "system", "--reply-to", "R")
    assert proc.returncode == 0, proc.stderr
    (file := tmp_path / "c.json").write_text("[1, 2, 3]")
    assert bus("publish", INBOX, "--content", f"@{file}").returncode == 0
    assert bus("publish", INBOX, "--text", "plain words").returncode == 0
    entries = entries_of(await redis.xrange(INBOX))
    assert entries[0][0] == proc.stdout.strip()
    envs = [Envelope.from_json(f[DATA_FIELD]) for _i, f in entries if f is not None]
    assert [e.content for e in envs] == [{"a": 1}, [1, 2, 3], "plain words"]
    assert (envs[0].role, envs[0].reply_to) == ("system", "R")


async def test_publish_count_is_a_load_generator(redis: Any, bus: Any) -> None:
    """--count N publishes N envelopes and reports the rate achieved."""
    proc = bus("publish", INBOX, "--content", '{"n": 0}', "--count", "1200")
    assert proc.returncode == 0, proc.stderr
    assert "published 1200 envelopes" in proc.stdout and "msgs/s" in proc.stdout
    assert int(await redis.xlen(INBOX)) == 1200


async def test_publish_bad_input_is_one_line(bus: Any) -> None:
    """Bad JSON and a missing @file are one clear line and exit 2, no traceback."""
    assert_one_line_error(bus("publish", INBOX, "--content", "{nope"), 2, "not valid JSON")
    assert_one_line_error(bus("publish", INBOX, "--content", "@/no/such/file"), 2, "cannot read")


async def test_groups_table_json_and_unknown_lag(redis: Any, bus: Any) -> None:
    """groups lists each group with consumers, pending and lag (a NULL lag is counted
    instead, marked and explained, never a silent 0); an unknown stream is a one-line
    error."""
    for i in range(3):
        await redis.xadd(
            INBOX, {DATA_FIELD: Envelope(role="user", content=i).to_json()}, id=f"{i + 1}-0"
        )
    await redis.xgroup_create(INBOX, "workers", id="0")
    await redis.xreadgroup("workers", "w1", {INBOX: ">"}, count=2)
    await redis.xgroup_create(INBOX, "odd", id="1-0")
    await redis.xdel(INBOX, "2-0")
    table = bus("groups", INBOX)
    assert table.returncode == 0, table.stderr
    assert "workers" in table.stdout and "- w1" in table.stdout and "pending=2" in table.stdout
    odd_line = next(line for line in table.stdout.splitlines() if line.startswith("odd"))
    assert odd_line.split()[3] == "1*"  # 3-0 is after the group's 1-0 (2-0 was deleted)
    assert "* odd: Redis reports lag NULL" in table.stdout
    data = json.loads(bus("groups", INBOX, "--json").stdout)
    by_name = {g["name"]: g for g in data["groups"]}
    assert by_name["workers"]["pending"] == 2 and by_name["workers"]["consumers"] == 1
    assert by_name["workers"]["consumer_list"][0]["name"] == "w1"
    assert by_name["odd"]["lag"] == 1 and "counted" in by_name["odd"]["lag_note"]
    assert_one_line_error(bus("groups", "AG1:no:such"), 1, "no such stream")


async def _dead_letters(redis: Any, n: int) -> None:
    dlq = KB.dead_letter("cli")
    for i in range(n):
        await redis.xadd(
            dlq,
            {
                "data": Envelope(role="user", content=i).to_json(),
                "reason": "max_deliveries",
                "error": "RuntimeError: boom",
                "deliveries": 5,
                "source_stream": INBOX,
                "source_id": f"{i + 1}-0",
                "group": "cli",
                "consumer": "c1",
                "dead_lettered_at": "2026-11-25T15:00:00+00:00",
            },
        )


async def test_dlq_list_replay_purge(redis: Any, bus: Any) -> None:
    """dlq list shows the dead letters (table and JSON); replay --id re-adds one to its
    source stream and removes it; purge refuses without a terminal or --yes, then
    deletes with --yes."""
    await _dead_letters(redis, 3)
    listed = bus("dlq", "list", "cli")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.strip().splitlines()) == 3 and "max_deliveries" in listed.stdout
    rows = [json.loads(line) for line in bus("dlq", "list", INBOX, "--json").stdout.splitlines()]
    assert [r["source_id"] for r in rows] == ["1-0", "2-0", "3-0"]
    replay = bus("dlq", "replay", "cli", "--id", rows[0]["id"])
    assert replay.returncode == 0, replay.stderr
    assert "1 replayed, 0 skipped" in replay.stdout
    ((_i, fields),) = entries_of(await redis.xrange(INBOX))
    assert fields is not None
    assert Envelope.from_json(fields[DATA_FIELD]).meta["dlq_replays"] == 1
    assert int(await redis.xlen(KB.dead_letter("cli"))) == 2
    usage = bus("dlq", "replay", "cli")
    assert usage.returncode == 2 and "one of the arguments --id --all is required" in usage.stderr
    assert_one_line_error(bus("dlq", "purge", "cli"), 2, "pass --yes")
    assert int(await redis.xlen(KB.dead_letter("cli"))) == 2
    purge = bus("dlq", "purge", "cli", "--yes")
    assert purge.returncode == 0 and "purged 2" in purge.stdout
    assert int(await redis.xlen(KB.dead_letter("cli"))) == 0
    assert_one_line_error(bus("dlq", "list", "nobody"), 1, "no dead letters for 'nobody'")


async def test_dlq_replay_all(redis: Any, bus: Any) -> None:
    """dlq replay --all re-adds every dead letter and empties the dead-letter stream."""
    await _dead_letters(redis, 4)
    proc = bus("dlq", "replay", KB.dead_letter("cli"), "--all")
    assert proc.returncode == 0 and "4 replayed" in proc.stdout
    assert int(await redis.xlen(INBOX)) == 4 and int(await redis.xlen(KB.dead_letter("cli"))) == 0


async def test_redis_down_is_one_line(bus: Any) -> None:
    """An unreachable Redis is one line naming the (redacted) URL and exit 1."""
    url = f"redis://user:s3cret@127.0.0.1:{pick_free_port()}/0"
    proc = bus("groups", INBOX, env={"REDIS_URL": url})
    assert_one_line_error(proc, 1, "cannot reach Redis")
    assert "s3cret" not in proc.stderr and "***" in proc.stderr
    proc = bus("--redis-url", url, "tail", INBOX)
    assert_one_line_error(proc, 1, "cannot reach Redis")


async def test_state_dir_and_local_redis_url_file(
    redis: Any, redis_url: str, bus: Any, tmp_path: Path, python_exe: str
) -> None:
    """--state-dir DIR reads DIR/redis.url; without REDIS_URL, ./.ag1/redis.url is used;
    a --state-dir without the file is a one-line error."""
    await redis.xadd(INBOX, {DATA_FIELD: Envelope(role="user").to_json()})
    state = tmp_path / "state"
    state.mkdir()
    (state / "redis.url").write_text(redis_url + "\n")
    down = f"redis://127.0.0.1:{pick_free_port()}/0"
    proc = bus("groups", INBOX, "--state-dir", str(state), env={"REDIS_URL": down})
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "work"
    (work / ".ag1").mkdir(parents=True)
    (work / ".ag1" / "redis.url").write_text(redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    local = subprocess.run(
        [python_exe, "-m", "core_bus.tools.cli", "groups", INBOX],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=30,
        check=False,
    )
    assert local.returncode == 0, local.stderr
    assert_one_line_error(
        bus("groups", INBOX, "--state-dir", str(tmp_path / "none")), 2, "redis.url"
    )


def test_every_command_has_help_with_example(bus: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """--help works for every command and shows an example (in-process for speed, plus
    one real subprocess)."""
    from core_bus.tools.cli import build_parser

    commands = [[], ["tail"], ["publish"], ["groups"], ["dlq"]]
    commands += [["dlq", action] for action in ("list", "replay", "purge")]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "ag1-bus" in out, command
    proc = bus("tail", "--help")
    assert proc.returncode == 0 and "example" in proc.stdout
