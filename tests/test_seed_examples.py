# ruff: noqa: E402, I001
"""The seed guide's examples (../shared/seed/README_advanced.md) run unmodified on core_bus."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from core_bus import Envelope, publish_envelope
from core_bus.consume.subscription import active_subscriptions, stop_all
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(15)]

# --- copied verbatim from README_advanced.md, "Dynamic Discovery & Subscription" ---
# fmt: off
from core_bus.bus import subscribe
from core_bus.keys import StreamKeyBuilder
import asyncio

async def dynamic_subscribe(redis, pattern, handler, group="agent_group", poll_delay=5):
    subscribed = set()
    while True:
        cursor = "0"
        while True:
            cursor, keys = await redis.scan(cursor=cursor, match=pattern)
            for key in keys:
                if isinstance(key, bytes):
                    key = key.decode()
                if key not in subscribed:
                    await subscribe(redis, key, handler, group)
                    subscribed.add(key)
            if cursor == "0":
                break
        await asyncio.sleep(poll_delay)
# fmt: on


# --- end of the verbatim copy ---


async def test_dynamic_subscribe_receives_from_streams_created_later(redis: Any) -> None:
    """dynamic_subscribe subscribes to streams that appear after it started and their
    envelopes reach the handler (each stream once, though the example rescans)."""
    kb = StreamKeyBuilder()
    got: list[tuple[str, Any]] = []

    async def handler(env: Envelope, redis: Any) -> None:
        got.append((str(env.user_id), env.content))

    await publish_envelope(redis, kb.user_inbox("early"), Envelope(role="user", user_id="early"))
    task = asyncio.get_running_loop().create_task(
        dynamic_subscribe(redis, "AG1:user:*:inbox", handler)
    )
    try:
        await eventually(lambda: ("early", None) in got, timeout=10)
        for user in ("late1", "late2"):
            await publish_envelope(
                redis, kb.user_inbox(user), Envelope(role="user", user_id=user, content=user)
            )
        await eventually(lambda: len(got) == 3, timeout=10)
        assert sorted(got, key=str) == sorted(
            [("early", None), ("late1", "late1"), ("late2", "late2")], key=str
        )
        subs = [s for s in active_subscriptions() if s.group == "agent_group"]
        assert sorted(s.streams[0] for s in subs) == sorted(
            kb.user_inbox(u) for u in ("early", "late1", "late2")
        )
    finally:
        await cancel_busy_task(task)
        await stop_all()


async def cancel_busy_task(task: asyncio.Task[Any]) -> None:
    """Cancel the example's task, repeating the request until it ends.

    The example never reaches its sleep (redis-py returns the SCAN cursor as
    int 0, so ``cursor == "0"`` never matches): it rescans back to back, and on
    Python 3.11 redis-py's ``asyncio.wait_for`` can swallow one cancellation.
    """
    with anyio.fail_after(10):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
    assert task.cancelled()


async def test_error_handling_handler_shape(redis: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's try/except handler shape: errors are caught in the handler, so the
    entry counts as processed and is acked (nothing retried or dead-lettered)."""
    processed: list[Any] = []

    async def handler(env, redis):  # type: ignore[no-untyped-def]
        try:
            # ... process envelope ...
            if env.content == "bad":
                raise ValueError("cannot handle bad")
            processed.append(env.content)
        except Exception as e:
            print(f"[ERROR] Failed to process envelope: {e}")

    stream = StreamKeyBuilder().agent_inbox("guide")
    for content in ("good", "bad"):
        await publish_envelope(redis, stream, Envelope(role="user", content=content))
    sub = await subscribe(redis, stream, handler)
    await eventually(lambda: sub.stats.processed == 2, timeout=10)
    await sub.stop()
    assert processed == ["good"] and sub.stats.failed == 0 and sub.stats.dead_lettered == 0
    assert "[ERROR] Failed to process envelope: cannot handle bad" in capsys.readouterr().out
    assert int((await redis.xpending(stream, "corebus"))["pending"]) == 0
