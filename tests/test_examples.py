"""The example agents of fleet.example.toml, driven through the real bus and a real Redis."""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from core_bus import Envelope, StreamKeyBuilder, publish_envelope, subscribe
from core_bus.rpc import bus_rpc_call, rpc_request
from examples import echo, flaky, planner, summarizer
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
KEYS = StreamKeyBuilder()


@asynccontextmanager
async def serving(
    redis: Any, agent: str, handler: Callable[..., Any], **options: Any
) -> AsyncIterator[Any]:
    """Run ``handler`` on ``agent``'s inbox with core_bus.subscribe, as a worker would."""
    sub = await subscribe(
        redis, KEYS.agent_inbox(agent), handler, group=agent, consumer=f"test-{agent}", **options
    )
    try:
        yield sub
    finally:
        await sub.stop(5)


# -- pure helpers ------------------------------------------------------------------


def test_summarise_is_first_sentence_and_word_count() -> None:
    """The summarizer's stand-in model: first sentence plus a word count."""
    assert summarizer.summarise("Redis streams are logs.  They  keep entries! More.") == {
        "summary": "Redis streams are logs.",
        "words": 8,
    }
    assert summarizer.summarise("   ") == {"summary": "", "words": 0}


def test_planner_splits_paragraphs_then_sentences() -> None:
    """Paragraphs become parts; a single paragraph is split into sentences; parts are capped."""
    assert planner.split_parts("One. Two.\n\nThree.") == ["One. Two.", "Three."]
    assert planner.split_parts("One. Two? Three!") == ["One.", "Two?", "Three!"]
    many = " ".join(f"S{i}." for i in range(20))
    parts = planner.split_parts(many, max_parts=4)
    assert len(parts) == 4 and parts[-1].startswith("S3.") and parts[-1].endswith("S19.")


def test_flaky_decides_from_content_then_at_random(monkeypatch: pytest.MonkeyPatch) -> None:
    """{"fail": true} always fails, {"fail": false} never; otherwise FLAKY_FAIL_RATE decides."""
    assert flaky.should_fail({"fail": True})
    assert not flaky.should_fail({"fail": False})
    monkeypatch.setenv("FLAKY_FAIL_RATE", "1")
    assert flaky.should_fail("anything")
    monkeypatch.setenv("FLAKY_FAIL_RATE", "0")
    assert not flaky.should_fail("anything")


# -- agents on the bus -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_echo_replies_with_same_content_and_correlation_id(redis: Any) -> None:
    """A request with reply_to gets one reply: same content and correlation id, from "echo"."""
    async with serving(redis, "echo", echo.handle):
        request = rpc_request(role="user", content={"hello": "world"}, reply_to="AG1:user:t:inbox")
        reply = await bus_rpc_call(redis, KEYS.agent_inbox("echo"), request, timeout=10)
    assert reply.correlation_id == request.correlation_id
    assert reply.content == {"hello": "world"}
    assert reply.role == "agent" and reply.agent_name == "echo"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_planner_fans_out_to_summarizer_and_gathers(redis: Any) -> None:
    """The planner's parts are summarised concurrently by the summarizer and returned in order."""
    text = "Streams keep order. They are fast.\n\nGroups share work.\n\nAcks confirm it. Done."
    async with (
        serving(redis, "summarizer", summarizer.handle, concurrency=8),
        serving(redis, "planner", planner.handle),
    ):
        request = rpc_request(role="user", content={"text": text})
        reply = await bus_rpc_call(redis, KEYS.agent_inbox("planner"), request, timeout=15)
    assert reply.agent_name == "planner"
    assert reply.content == {
        "parts": 3,
        "summaries": ["Streams keep order.", "Groups share work.", "Acks confirm it."],
        "words": 13,
    }
    # every fan-out request was acked by the summarizer group
    pending = await redis.xpending(KEYS.agent_inbox("summarizer"), "summarizer")
    assert pending["pending"] == 0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_flaky_failure_lands_in_the_dead_letter_stream_after_three_deliveries(
    redis: Any,
) -> None:
    """{"fail": true} is retried and dead-lettered after exactly max_deliveries (3), then acked."""
    dlq = KEYS.dead_letter("flaky")
    async with serving(redis, "flaky", flaky.handle, max_deliveries=3):
        await publish_envelope(
            redis, KEYS.agent_inbox("flaky"), Envelope(role="user", content={"fail": True})
        )
        await eventually(lambda: redis.xlen(dlq), timeout=20, message="a dead letter")
    [(_id, fields)] = await redis.xrange(dlq)
    assert int(fields[b"deliveries"]) == 3
    assert b"FlakyError" in fields[b"error"]
    pending = await redis.xpending(KEYS.agent_inbox("flaky"), "flaky")
    assert pending["pending"] == 0


# -- the shell agent ---------------------------------------------------------------


def _receive(sock: socket.socket) -> tuple[int, int | None, str]:
    """One sd_notify datagram: (sender pid, sender pgid while alive, text); barrier fds closed."""
    fd_size = array.array("i").itemsize
    data, ancdata, _flags, _addr = sock.recvmsg(
        4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * fd_size)
    )
    pid, fds = 0, array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[:12])[0]
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
    try:
        pgid: int | None = os.getpgid(pid)
    except OSError:
        pgid = None
    for fd in fds:  # release systemd-notify's BARRIER=1 only after looking at the sender
        os.close(fd)
    return pid, pgid, data.decode()


@pytest.mark.timeout(30)
def test_shell_agent_speaks_sd_notify_and_stops_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    """READY=1 then WATCHDOG=1 heartbeats from the agent's process group; SIGTERM: exit 0 fast."""
    if shutil.which("systemd-notify") is None:
        pytest.skip("systemd-notify is not installed")
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(10)
    stream = KEYS.agent_inbox("shell-agent")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": address,
        "AG1_WORKER": "shell-agent/0",
        "AG1_STREAMS": stream,
        "REDIS_URL": redis_url,
        "SHELL_AGENT_INTERVAL": "0.2",
    }
    proc = subprocess.Popen(
        ["sh", "examples/shell_agent.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        messages: list[str] = []
        while not any("WATCHDOG=1" in m for m in messages):
            pid, pgid, text = _receive(sock)
            if "BARRIER=1" in text:
                continue
            assert pgid == proc.pid, f"sender {pid} is not in the agent's process group"
            messages.append(text)
        assert "READY=1" in messages[0] and "STATUS=watching " + stream in messages[0]

        os.killpg(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 3
        assert proc.stdout is not None
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        sock.close()
    assert "shell-agent/0: ready" in output
    assert f"shell-agent/0: {stream} holds 0 entries" in output  # once: when it changes
    assert output.rstrip().endswith("SIGTERM received, exiting")
