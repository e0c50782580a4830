"""The prototype's entry points in process: blocking forms stop cleanly on cancellation,
handlers of one and two arguments work everywhere, registration and field extraction."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from core_bus.agent_bus_minimal import (
    extract_envelope_fields,
    register_with_a2a_handler,
    register_with_llm_handler,
    register_with_tg_handler,
    start_bus_subscriptions,
    subscribe_agent_bus,
)
from core_bus.bus import subscribe_simple
from core_bus.consume.handle import running_handles
from core_bus.envelope import Envelope
from core_bus.publish import publish_envelope
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_blocking_start_bus_subscriptions_runs_until_cancelled(redis: Any) -> None:
    """It handles entries while it runs; cancelling its task drains and leaves nothing
    running (the group's entries are acked)."""
    got: list[Any] = []

    async def handler(env: Envelope) -> None:
        got.append(env.content)

    stream = "AG1:agent:blk:inbox"
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_bus_subscriptions(redis, "AG1:agent:*:inbox", "blk", handler))
        await publish_envelope(redis, stream, Envelope(role="u", content="one"))
        await eventually(lambda: got == ["one"])
        tg.cancel_scope.cancel()
    assert not running_handles()
    assert int((await redis.xpending(stream, "blk"))["pending"]) == 0


async def test_blocking_form_rejects_a_bad_handler_at_once(redis: Any) -> None:
    def not_async(env: Envelope) -> None:
        pass

    with pytest.raises(TypeError), anyio.fail_after(5):
        await start_bus_subscriptions(redis, "AG1:*", "g", not_async)


@pytest.mark.parametrize("arity", [1, 2])
async def test_subscribe_simple_with_either_handler_shape(redis: Any, arity: int) -> None:
    """Group-less follower: entries after start only ("$"), malformed ones skipped, a
    failing callback does not stop it; both handler shapes get the envelope."""
    stream = "AG1:flow:simple:output"
    await publish_envelope(redis, stream, Envelope(role="u", content="old"))
    got: list[Any] = []

    async def one(env: Envelope) -> None:
        if env.content == "boom":
            raise RuntimeError("boom")
        got.append(env.content)

    async def two(env: Envelope, redis: Any) -> None:
        await one(env)

    async with anyio.create_task_group() as tg:
        tg.start_soon(subscribe_simple, redis, stream, one if arity == 1 else two, 0.2)

        async def send_until_seen() -> bool:
            await publish_envelope(redis, stream, Envelope(role="u", content="first"))
            return "first" in got

        await eventually(send_until_seen, interval=0.1)
        await redis.xadd(stream, {"data": b"not json"})
        await publish_envelope(redis, stream, Envelope(role="u", content="boom"))
        await publish_envelope(redis, stream, Envelope(role="u", content="after"))
        await eventually(lambda: "after" in got)
        tg.cancel_scope.cancel()
    assert "old" not in got and "boom" not in got
    assert not await redis.xinfo_groups(stream)


@pytest.mark.parametrize("arity", [1, 2])
async def test_subscribe_agent_bus_with_either_handler_shape(
    redis: Any, redis_url: str, arity: int
) -> None:
    """It registers (a2a by default), serves the agent's inbox in the agent's group, and
    closes the connection it opened when cancelled."""
    got: list[Any] = []

    async def one(env: Envelope) -> None:
        got.append(env.content)

    async def two(env: Envelope, redis: Any) -> None:
        got.append(env.content)

    config = {"agent_name": "shape", "redis_url": redis_url}
    async with anyio.create_task_group() as tg:
        tg.start_soon(subscribe_agent_bus, config, one if arity == 1 else two)
        regs = await eventually(lambda: redis.xrange("AG1:a2a:register"))
        env = Envelope.from_json(regs[0][1][b"data"])
        assert (env.envelope_type, env.agent_name) == ("register", "shape")
        await publish_envelope(redis, "AG1:agent:shape:inbox", Envelope(role="u", content=1))
        await eventually(lambda: got == [1])
        tg.cancel_scope.cancel()
    groups = await redis.xinfo_groups("AG1:agent:shape:inbox")
    assert [g["name"] for g in groups] == [b"shape"]


async def test_register_helpers_write_to_each_register_stream(redis: Any) -> None:
    await register_with_tg_handler(redis, "bot", capabilities=["chat"])
    await register_with_llm_handler(redis, {"name": "bot", "description": "helps"})
    await register_with_a2a_handler(redis, "bot")
    for stream in ("AG1:tg:register", "AG1:edge:llm:register", "AG1:a2a:register"):
        [(_id, fields)] = await redis.xrange(stream)
        env = Envelope.from_json(fields[b"data"])
        assert env.agent_name == "bot" and env.content["inbox"] == "AG1:agent:bot:inbox"
        assert env.reply_to == "AG1:agent:bot:inbox"
    tg = Envelope.from_json((await redis.xrange("AG1:tg:register"))[0][1][b"data"])
    assert tg.content["capabilities"] == ["chat"] and tg.content["platform"] == "tg"
    llm = Envelope.from_json((await redis.xrange("AG1:edge:llm:register"))[0][1][b"data"])
    assert llm.content["description"] == "helps"
    with pytest.raises(ValueError, match="no name"):
        await register_with_a2a_handler(redis, {"group": "x"})


def test_extract_envelope_fields_from_what_agents_hold() -> None:
    env = Envelope(role="user", content={"q": 1}, user_id="u")
    expected = env.to_dict()
    assert extract_envelope_fields(env) == expected
    assert extract_envelope_fields({b"data": env.to_json()}) == expected
    assert extract_envelope_fields({"envelope": env.to_json().decode()}) == expected
    assert extract_envelope_fields(env.to_json()) == expected
    assert extract_envelope_fields(expected) == expected
    with pytest.raises(ValueError, match="invalid_json"):
        extract_envelope_fields({b"data": b"{nope"})
    with pytest.raises(ValueError, match="not an envelope"):
        extract_envelope_fields(42)
