"""Summarizer agent: the worker the planner fans out to.

A stand-in for a model call: the "summary" of a text is its first sentence plus
a word count. Requests carry ``{"text": "..."}`` (or a plain string); the reply
goes to ``reply_to`` with the request's correlation id.
"""

from __future__ import annotations

import re
from typing import Any

from core_bus import Envelope
from core_bus.rpc import rpc_reply

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def summarise(text: str) -> dict[str, Any]:
    """``{"summary": first sentence, "words": word count}`` of ``text``."""
    stripped = " ".join(text.split())
    first = _SENTENCE_END.split(stripped, maxsplit=1)[0] if stripped else ""
    return {"summary": first, "words": len(stripped.split())}


def text_of(content: Any) -> str:
    """The text to work on: a string, or the ``text`` field of a dict."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return str(content["text"])
    raise ValueError(f"expected a string or {{'text': ...}}, got {type(content).__name__}")


async def handle(env: Envelope, redis: Any) -> None:
    """Summarise the request's text and reply over RPC."""
    result = summarise(text_of(env.content))
    if env.reply_to:
        reply = Envelope(
            role="agent",
            agent_name="summarizer",
            content=result,
            envelope_type="rpc_reply",
            task_id=env.task_id,
            session_code=env.session_code,
        )
        await rpc_reply(redis, env, reply)
