"""Planner agent: fans a text out to the summarizer over RPC and gathers the replies.

The request's text is split into parts (paragraphs, or sentences for a single
paragraph); each part goes to the summarizer's inbox as its own RPC call, all
concurrently; the replies are put back in order and sent to the caller.

If a summarizer reply does not arrive in time, the handler raises
:class:`core_bus.RpcTimeout`: the request is not acked, so the bus delivers it
again (and dead-letters it after ``max_deliveries``).
"""

from __future__ import annotations

import re
from typing import Any

import anyio

from core_bus import Envelope, RpcTimeout, StreamKeyBuilder, get_settings
from core_bus.rpc import bus_rpc_call, rpc_reply, rpc_request
from examples.summarizer import text_of

#: At most this many parts per request (the rest is merged into the last part).
MAX_PARTS = 8
#: Seconds to wait for each summarizer reply.
PART_TIMEOUT = 10.0

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_parts(text: str, max_parts: int = MAX_PARTS) -> list[str]:
    """Paragraphs of ``text``, or its sentences when it is one paragraph."""
    parts = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    if len(parts) == 1:
        parts = [s.strip() for s in _SENTENCE_END.split(parts[0]) if s.strip()]
    if len(parts) > max_parts:
        parts = [*parts[: max_parts - 1], " ".join(parts[max_parts - 1 :])]
    return parts


async def summarise_parts(redis: Any, parts: list[str], env: Envelope) -> list[dict[str, Any]]:
    """One concurrent RPC call per part to the summarizer; results in part order."""
    inbox = StreamKeyBuilder(get_settings().bus_namespace).agent_inbox("summarizer")
    results: list[dict[str, Any]] = [{} for _ in parts]
    failures: list[RpcTimeout] = []

    async def ask(index: int, part: str) -> None:
        request = rpc_request(
            role="agent",
            content={"text": part},
            agent_name="planner",
            task_id=env.task_id,
            session_code=env.session_code,
        )
        try:
            reply = await bus_rpc_call(redis, inbox, request, timeout=PART_TIMEOUT)
        except RpcTimeout as exc:
            failures.append(exc)
            return
        results[index] = dict(reply.content or {})

    async with anyio.create_task_group() as tg:
        for index, part in enumerate(parts):
            tg.start_soon(ask, index, part)
    if failures:
        raise failures[0]
    return results


async def handle(env: Envelope, redis: Any) -> None:
    """Split, fan out, gather, reply ``{"parts", "summaries", "words"}`` to ``reply_to``."""
    parts = split_parts(text_of(env.content))
    results = await summarise_parts(redis, parts, env)
    if env.reply_to:
        reply = Envelope(
            role="agent",
            agent_name="planner",
            content={
                "parts": len(parts),
                "summaries": [r.get("summary", "") for r in results],
                "words": sum(int(r.get("words", 0)) for r in results),
            },
            envelope_type="rpc_reply",
            task_id=env.task_id,
            session_code=env.session_code,
        )
        await rpc_reply(redis, env, reply)
