"""The tail tool: read-only XREAD, backlog then live, patterns, malformed entries, Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from core_bus.envelope import Envelope
from core_bus.publish import DATA_FIELD, _announced, publish_envelope
from core_bus.tail import entry_json, format_entry, parse_entry

pytestmark = pytest.mark.anyio

STREAM = "AG1:agent:tailme:inbox"


class LineReader:
    """Collects a child's stdout lines on a thread so tests can wait with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def wait_lines(self, n: int, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"expected {n} lines, got {self.lines!r}")
            try:
                self.lines.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                continue
        return self.lines


@pytest.fixture
def tail_proc(redis_url: str, python_exe: str) -> Iterator[Any]:
    """Start ``python -m core_bus.tail ARGS`` against the test server; killed at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], LineReader]:
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [python_exe, "-m", "core_bus.tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        return proc, LineReader(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.timeout(40)
async def test_tail_backlog_live_then_sigint_exits_zero(redis: Any, tail_proc: Any) -> None:
    """Backlog (including a malformed entry) is shown, then an entry published after start;
    SIGINT ends tail with exit 0, no traceback, and no consumer group was created."""
    for i in range(3):
        await publish_envelope(
            redis, STREAM, Envelope(role="user", content=f"old {i}", agent_name="alice")
        )
    await redis.xadd(STREAM, {DATA_FIELD: b"{not json"})
    proc, reader = tail_proc(STREAM, "--from-start")
    lines = await _wait(reader, 4)
    assert ['"old 0"' in lines[0], '"old 1"' in lines[1], '"old 2"' in lines[2]] == [True] * 3
    assert "agent=alice" in lines[0] and "user" in lines[0]
    assert "MALFORMED(invalid json)" in lines[3]
    live = Envelope(role="assistant", content={"live": True}, correlation_id="cid-live-1")
    live.add_hop("tester")
    await publish_envelope(redis, STREAM, live)
    lines = await _wait(reader, 5)
    assert '{"live":true}' in lines[4] and "cid=cid-live" in lines[4] and "trace=tester" in lines[4]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    assert "Traceback" not in proc.stderr.read()
    assert await redis.xinfo_groups(STREAM) == []


@pytest.mark.timeout(40)
async def test_tail_last_n_json_and_count(redis: Any, tail_proc: Any) -> None:
    """--last N shows only the newest N of the backlog; --json prints one object per line;
    --count makes tail exit 0 by itself."""
    for i in range(5):
        await publish_envelope(redis, STREAM, Envelope(role="user", content=i))
    proc, reader = tail_proc(STREAM, "--last", "2", "--json", "--count", "3")
    lines = await _wait(reader, 2)
    assert [json.loads(line)["envelope"]["content"] for line in lines] == [3, 4]
    await redis.xadd(STREAM, {"other": "x"})
    lines = await _wait(reader, 3)
    third = json.loads(lines[2])
    assert third["malformed"] == "no data field" and third["fields"] == {"other": "x"}
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(40)
async def test_tail_pattern_follows_new_streams(redis: Any, tail_proc: Any) -> None:
    """A glob pattern tails every matching stream and picks up one created after start
    from the discovery notice (no wait for a re-scan)."""
    first, later = "AG1:agent:pat1:inbox", "AG1:agent:pat2:inbox"
    _announced.difference_update({first, later})
    await publish_envelope(redis, first, Envelope(role="user", content="one"))
    await publish_envelope(redis, "AG1:agent:pat1:outbox", Envelope(role="user", content="no"))
    proc, reader = tail_proc("AG1:agent:*:inbox", "--last", "5")
    lines = await _wait(reader, 1)
    assert first in lines[0] and '"one"' in lines[0]
    started = time.monotonic()
    await publish_envelope(redis, later, Envelope(role="user", content="two"))
    lines = await _wait(reader, 2)
    assert later in lines[1] and '"two"' in lines[1]
    assert time.monotonic() - started < 4.5  # well before the 5 s re-scan
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


async def _wait(reader: LineReader, n: int) -> list[str]:
    return await anyio.to_thread.run_sync(reader.wait_lines, n)


def test_format_shows_malformed_kinds_without_crashing() -> None:
    """Every kind of bad entry renders as one MALFORMED line (and as JSON), never raises."""
    cases = {
        "deleted entry": None,
        "no data field": {"x": b"1"},
        "invalid utf-8": {"data": b"\xff\xfe"},
        "invalid json": {"data": b"{"},
        "not an envelope": {"data": b"[1, 2]"},
    }
    for why, fields in cases.items():
        assert parse_entry(fields) == (None, why)
        assert f"MALFORMED({why})" in format_entry("s", "1-0", fields, show_stream=True)
        assert json.loads(entry_json("s", "1-0", fields))["malformed"] == why


def test_format_long_content_is_one_truncated_line() -> None:
    """Long or multi-line content is previewed on one line, cut with an ellipsis."""
    env = Envelope(role="user", content="line\n" * 100, correlation_id="abcdefghijkl")
    line = format_entry("s", "1732540000000-0", {"data": env.to_json()}, show_stream=False)
    assert "\n" not in line and "…" in line and "cid=abcdefgh " in line
    assert line.startswith("2024-11-25T13:06:40.000Z 1732540000000-0 user")


@pytest.mark.timeout(40)
async def test_tail_waits_for_a_stream_that_does_not_exist_yet(redis: Any, tail_proc: Any) -> None:
    """Tailing a missing stream says so on stderr and shows its first entry once created."""
    proc, reader = tail_proc("AG1:agent:notyet:inbox")
    assert proc.stderr is not None
    which = await anyio.to_thread.run_sync(proc.stderr.readline)
    assert which.startswith("ag1-bus: Redis ") and "(from $REDIS_URL)" in which
    note = await anyio.to_thread.run_sync(proc.stderr.readline)
    assert "does not exist yet" in note
    await publish_envelope(redis, "AG1:agent:notyet:inbox", Envelope(role="user", content="hi"))
    lines = await _wait(reader, 1)
    assert '"hi"' in lines[0]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


@pytest.mark.timeout(60)
async def test_tail_survives_redis_restart(
    redis_server_factory: Any, python_exe: str, tmp_path: Any
) -> None:
    """When Redis goes away and comes back (AOF on), tail reports it on stderr, keeps
    running and shows the entries written after the restart."""
    import redis.asyncio as redis_asyncio

    server = redis_server_factory(appendonly=True)
    client = redis_asyncio.Redis.from_url(server.url)
    env = {**os.environ, "REDIS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [python_exe, "-m", "core_bus.tail", STREAM, "--from-start", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        reader = LineReader(proc)
        await client.xadd(STREAM, {DATA_FIELD: Envelope(role="user", content="before").to_json()})
        assert '"before"' in (await _wait(reader, 1))[0]
        await anyio.to_thread.run_sync(server.stop)
        assert proc.stderr is not None
        note = await anyio.to_thread.run_sync(proc.stderr.readline)
        assert "lost the Redis connection" in note
        redis_server_factory(port=server.port, data_dir=server.data_dir, appendonly=True)
        await client.aclose()
        client = redis_asyncio.Redis.from_url(server.url)
        await client.xadd(STREAM, {DATA_FIELD: Envelope(role="user", content="after").to_json()})
        assert '"after"' in (await _wait(reader, 2))[1]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        await client.aclose()
