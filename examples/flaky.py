"""Flaky agent: fails sometimes, to show retries and the dead-letter stream.

- content ``{"fail": true}``: always raises, so after ``max_deliveries``
  (3 in ``fleet.example.toml``) the entry lands in ``AG1:dlq:flaky``
  (see it with ``ag1-bus dlq list flaky``);
- content ``{"fail": false}``: never fails;
- anything else fails at random with probability ``$FLAKY_FAIL_RATE`` (0.3):
  the bus delivers it again until it succeeds or runs out of deliveries.

Successful requests are answered on ``reply_to``.
"""

from __future__ import annotations

import os
import random
from typing import Any

from core_bus import Envelope
from core_bus.rpc import rpc_reply


class FlakyError(RuntimeError):
    """The failure this agent simulates."""


def fail_rate() -> float:
    """Probability of a random failure, from ``$FLAKY_FAIL_RATE`` (default 0.3)."""
    try:
        return min(1.0, max(0.0, float(os.environ.get("FLAKY_FAIL_RATE", "0.3"))))
    except ValueError:
        return 0.3


def should_fail(content: Any) -> bool:
    """True for ``{"fail": true}``, False for ``{"fail": false}``, else at random."""
    if isinstance(content, dict) and isinstance(content.get("fail"), bool):
        return bool(content["fail"])
    return random.random() < fail_rate()


async def handle(env: Envelope, redis: Any) -> None:
    """Raise :class:`FlakyError` (not acked: retried) or reply ``{"ok": true}``."""
    if should_fail(env.content):
        raise FlakyError(f"flaky agent failed on purpose (envelope {env.envelope_id})")
    if env.reply_to:
        reply = Envelope(role="agent", agent_name="flaky", content={"ok": True})
        await rpc_reply(redis, env, reply)
