"""Echo agent: replies to ``reply_to`` with the content it received.

Try it (with the example fleet running)::

    ag1-bus publish AG1:agent:echo:inbox --content '"hello"' --reply-to AG1:user:me:inbox
    ag1-bus tail AG1:user:me:inbox
"""

from __future__ import annotations

from typing import Any

import structlog

from core_bus import Envelope
from core_bus.rpc import rpc_reply

log = structlog.get_logger("examples.echo")


async def handle(env: Envelope, redis: Any) -> None:
    """Send ``env.content`` back to ``env.reply_to`` with the same correlation id."""
    if not env.reply_to:
        log.debug("echo_no_reply_to", envelope_id=env.envelope_id)
        return
    reply = Envelope(
        role="agent",
        agent_name="echo",
        content=env.content,
        envelope_type="rpc_reply",
        task_id=env.task_id,
        session_code=env.session_code,
        user_id=env.user_id,
    )
    await rpc_reply(redis, env, reply)  # copies env.correlation_id onto the reply
