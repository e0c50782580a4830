"""Pattern discovery: start_bus_subscriptions subscribes once per matching stream,
picks up new streams from discovery notices and from the SCAN poll, and stops cleanly."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
import redis.asyncio as redis_asyncio

from core_bus.consume.subscription import active_subscriptions
from core_bus.discovery import glob_match, start_bus_subscriptions
from core_bus.envelope import Envelope
from core_bus.publish import DATA_FIELD, _announced, publish_envelope
from supervisor.redis.server import pick_free_port
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def _fresh(*streams: str) -> None:
    """Forget this process' discovery notices so the next publish announces again."""
    _announced.difference_update(streams)


async def test_existing_streams_subscribed_before_return(redis: Any) -> None:
    """Streams matching at start are subscribed when the call returns; non-matching
    streams, dead-letter streams and the notices stream never are."""
    _fresh("AG1:agent:a:inbox", "AG1:agent:b:inbox", "AG1:agent:a:outbox")
    for stream in ("AG1:agent:a:inbox", "AG1:agent:b:inbox", "AG1:agent:a:outbox"):
        await publish_envelope(redis, stream, Envelope(role="user", content=stream))
    await redis.xadd("AG1:dlq:agent", {"data": b"x"})
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.content)

    handle = await start_bus_subscriptions(redis, ["AG1:agent:*:inbox", "AG1:*"], "g", handler)
    try:
        assert "AG1:agent:a:inbox" in handle.streams and "AG1:agent:b:inbox" in handle.streams
        assert "AG1:dlq:agent" not in handle.streams
        assert "AG1:bus:streams" not in handle.streams
        await eventually(lambda: len(got) == 3, message="backlog handled")
        assert sorted(got) == ["AG1:agent:a:inbox", "AG1:agent:a:outbox", "AG1:agent:b:inbox"]
    finally:
        await handle.stop()
    assert not handle.running
    assert all(not sub.running for sub in handle.subscriptions.values())


async def test_new_stream_found_via_notice_without_poll(redis: Any) -> None:
    """With a poll far in the future, a stream created by publish_envelope after start is
    subscribed from its discovery notice, and its first envelope reaches the handler."""
    got: list[Any] = []

    async def handler(env: Envelope, redis: Any) -> None:
        got.append(env.content)

    async with await start_bus_subscriptions(
        redis, "AG1:user:*:inbox", "g", handler, poll_delay=3600
    ) as handle:
        assert handle.streams == []
        _fresh("AG1:user:late:inbox")
        started = anyio.current_time()
        await publish_envelope(redis, "AG1:user:late:inbox", Envelope(role="user", content="hi"))
        await eventually(lambda: got == ["hi"], message="notice-driven delivery")
        assert anyio.current_time() - started < 10
        assert handle.streams == ["AG1:user:late:inbox"]
    assert not handle.running


async def test_new_stream_found_via_scan_poll(redis: Any) -> None:
    """A stream created by a plain XADD (no notice) is found by the periodic SCAN."""
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.content)

    async with await start_bus_subscriptions(
        redis, "AG1:flow:*:input", "g", handler, poll_delay=0.2
    ) as handle:
        await redis.xadd(
            "AG1:flow:raw:input", {DATA_FIELD: Envelope(role="user", content=7).to_json()}
        )
        await eventually(lambda: got == [7], message="scan-driven delivery")
        assert handle.streams == ["AG1:flow:raw:input"]


async def test_each_stream_subscribed_once_and_each_entry_handled_once(redis: Any) -> None:
    """A stream seen by both the notice follower and the SCAN poll gets one
    subscription; every envelope is handled exactly once."""
    seen: Counter[Any] = Counter()

    async def handler(env: Envelope) -> None:
        seen[env.content] += 1

    names = [f"AG1:agent:once{i}:inbox" for i in range(5)]
    _fresh(*names)
    async with await start_bus_subscriptions(
        redis, "AG1:agent:once*:inbox", "g", handler, poll_delay=0.05
    ) as handle:
        for i, name in enumerate(names):
            for j in range(20):
                await publish_envelope(redis, name, Envelope(role="user", content=f"{i}-{j}"))
        await eventually(lambda: len(seen) == 100, message="all handled")
        scans = handle.scans
        await eventually(lambda: handle.scans >= scans + 3, message="more polls")
        assert set(seen.values()) == {1}
        assert handle.streams == sorted(names)
        mine = [s for s in active_subscriptions() if s.group == "g"]
        assert sorted(s.streams[0] for s in mine) == sorted(names)
    assert [s for s in active_subscriptions() if s.group == "g"] == []


async def test_first_use_guide_shape(redis_url: str) -> None:
    """The prototype guide's shape on the handle-returning form (core_bus.discovery): a
    handler closing over the client that replies with publish_envelope, keyword call
    with patterns like kb.agent_inbox("*"); the await returns promptly. (The guide's own
    import path, agent_bus_minimal, blocks: tests/test_prototype_programs.py.)"""
    from core_bus.bus import build_redis_url, publish_envelope
    from core_bus.discovery import start_bus_subscriptions as start
    from core_bus.keys import StreamKeyBuilder

    assert build_redis_url()  # the guide builds its URL with it
    redis = redis_asyncio.Redis.from_url(redis_url)
    await redis.flushall()
    kb = StreamKeyBuilder()

    async def handle_bus_envelope(env: Envelope) -> None:
        reply = Envelope(role="agent", content=f"echo: {env.content}", agent_name="echo")
        await publish_envelope(redis, env.reply_to or kb.agent_outbox("echo"), reply)

    try:
        with anyio.fail_after(5):
            handle = await start(
                redis=redis,
                patterns=[kb.agent_inbox("*")],
                group="echo_agent",
                handler=handle_bus_envelope,
            )
        _fresh(kb.agent_inbox("echo"))
        await publish_envelope(
            redis,
            kb.agent_inbox("echo"),
            Envelope(role="user", content="hello", reply_to=kb.user_inbox("u1")),
        )
        replies = await eventually(lambda: redis.xrange(kb.user_inbox("u1")), message="reply")
        assert Envelope.from_json(replies[0][1][b"data"]).content == "echo: hello"
        await handle.stop()
    finally:
        await redis.aclose()


async def test_bad_handler_rejected_at_start(redis: Any) -> None:
    """A handler that is not async def h(env) / h(env, redis) fails at the call."""

    def not_async(env: Envelope) -> None:
        pass

    with pytest.raises(TypeError):
        await start_bus_subscriptions(redis, "AG1:*", "g", not_async)


async def test_redis_down_at_start_then_up(redis_server_factory: Any, tmp_path: Any) -> None:
    """With Redis unreachable the call still returns at once; discovery retries in the
    background and subscribes once the server is up."""
    port = pick_free_port()
    client = redis_asyncio.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=2)
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.content)

    try:
        with anyio.fail_after(5):
            handle = await start_bus_subscriptions(
                client, "AG1:agent:*:inbox", "g", handler, poll_delay=0.2
            )
        assert handle.running and handle.streams == []
        redis_server_factory(port=port, appendonly=False)
        await client.xadd(
            "AG1:agent:up:inbox", {DATA_FIELD: Envelope(role="user", content=1).to_json()}
        )
        await eventually(lambda: got == [1], timeout=20, message="delivery after Redis came up")
        await handle.stop()
    finally:
        await client.aclose()


def test_glob_match_follows_redis_syntax() -> None:
    """Notices are matched like SCAN MATCH: *, ?, classes, negated classes, escapes."""
    assert glob_match("AG1:agent:*:inbox", "AG1:agent:x:y:inbox")
    assert not glob_match("AG1:agent:*:inbox", "AG1:agent:x:outbox")
    assert glob_match("AG1:user:?:inbox", "AG1:user:a:inbox")
    assert glob_match("h[ae]llo", "hallo") and not glob_match("h[ae]llo", "hillo")
    assert glob_match("h[^e]llo", "hallo") and not glob_match("h[^e]llo", "hello")
    assert glob_match("h[a-c]llo", "hbllo")
    assert glob_match(r"a\*b", "a*b") and not glob_match(r"a\*b", "axb")
    assert glob_match("a.b", "a.b") and not glob_match("a.b", "axb")
