"""The prototype's ``agent_bus_minimal`` import path: its entry points, with its behaviour.

Its first-use guide does::

    from core_bus.agent_bus_minimal import start_bus_subscriptions
    ...
    await start_bus_subscriptions(redis=redis, patterns=patterns, group="my_agent_group",
                                  handler=handler_with_redis)

and relies on the call running until the program is stopped. So here the
entry points that blocked in the prototype block again
(:func:`start_bus_subscriptions`, :func:`discover_and_subscribe`,
:func:`subscribe_agent_bus`): they run until cancelled, and on SIGINT/SIGTERM
(when the program installed no handler of its own) they drain and return, so
``asyncio.run(main())`` exits 0 without a traceback
(:mod:`core_bus.foreground`). New code that wants a handle uses
:func:`core_bus.discovery.start_bus_subscriptions`, which returns one.
Handlers are ``async def h(env)`` or ``async def h(env, redis)`` everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.consume.decode import Malformed, decode_payload, payload_of
from core_bus.consume.handlers import Handler, handler_arity
from core_bus.consume.subscription import ensure_group, subscribe, subscription
from core_bus.discovery import DEFAULT_GROUP, BusSubscriptions, bus_subscriptions
from core_bus.envelope import Envelope
from core_bus.foreground import run_until_stopped
from core_bus.keys import StreamKeyBuilder, cluster_from_env
from core_bus.log import get_logger
from core_bus.publish import publish_envelope
from core_bus.registration import AgentIdentity, register_with
from core_bus.settings import build_redis_url, connect, get_settings

__all__ = [
    "BusSubscriptions",
    "Envelope",
    "StreamKeyBuilder",
    "build_redis_url",
    "discover_and_subscribe",
    "ensure_group",
    "extract_envelope_fields",
    "get_patterns",
    "get_redis",
    "publish_envelope",
    "register_with_a2a_handler",
    "register_with_llm_handler",
    "register_with_tg_handler",
    "start_bus_subscriptions",
    "subscribe",
    "subscribe_agent_bus",
]


def get_patterns(agent_name: str) -> list[str]:
    """The prototype's helper: the stream patterns of an agent (its inbox)."""
    keys = StreamKeyBuilder(get_settings().bus_namespace, cluster=cluster_from_env())
    return [keys.agent_inbox(agent_name)]


async def get_redis() -> Any:
    """The prototype's helper: a client for ``build_redis_url()`` (caller closes it)."""
    return connect(build_redis_url())


async def start_bus_subscriptions(
    redis: AsyncRedis,
    patterns: str | Sequence[str],
    group: str | None = DEFAULT_GROUP,
    handler: Handler | None = None,
    poll_delay: float = 5.0,
    *,
    consumer: str | None = None,
    **subscribe_options: Any,
) -> None:
    """Consume every stream matching ``patterns`` (now and later) until stopped.

    Runs until cancelled, or until SIGINT/SIGTERM (then drains and returns).
    Arguments as for :func:`core_bus.discovery.start_bus_subscriptions`, which
    returns a handle instead.

    :raises TypeError: ``handler`` is not an accepted handler (at once).
    """
    handle = bus_subscriptions(
        redis, patterns, group, handler, poll_delay, consumer=consumer, **subscribe_options
    )
    await run_until_stopped(handle)


async def discover_and_subscribe(
    redis: AsyncRedis,
    pattern: str | Sequence[str],
    group: str,
    handler: Handler,
    poll_delay: float = 5.0,
) -> None:
    """The prototype's single-pattern entry point; same as :func:`start_bus_subscriptions`."""
    await start_bus_subscriptions(redis, pattern, group, handler, poll_delay=poll_delay)


async def subscribe_agent_bus(
    config: Any, handle_bus_envelope: Handler, *, redis: AsyncRedis | None = None
) -> None:
    """Run an agent: connect, consume its inbox, register once consuming; until stopped.

    ``config`` is the agent's name or the prototype's config (dict or object:
    ``agent_name``, optional ``group``, ``inbox``, ``redis_url``, ``register``
    — platforms among ``tg``, ``llm``, ``a2a``, default ``a2a``). The
    connection (``redis_url``, else the environment) is closed on the way out
    unless ``redis`` was passed in.
    """
    handler_arity(handle_bus_envelope)
    identity = AgentIdentity.of(config)
    client = redis if redis is not None else connect(identity.redis_url or build_redis_url())
    try:
        sub = subscription(client, identity.inbox, handle_bus_envelope, identity.group)

        async def register() -> None:  # once the inbox is served: replies find a reader
            for platform in identity.register:
                await register_with(client, identity, platform)
            get_logger("core_bus.agent", agent=identity.name).info(
                "agent_registered", inbox=identity.inbox, platforms=",".join(identity.register)
            )

        await run_until_stopped(sub, register)
    finally:
        if redis is None:
            with anyio.CancelScope(shield=True):  # cancelled or not, the sockets close
                await client.aclose()


async def register_with_tg_handler(redis: AsyncRedis, config: Any, **extra: Any) -> str:
    """Announce the agent to the Telegram edge handler (``AG1:tg:register``); the entry id."""
    return await register_with(redis, config, "tg", **extra)


async def register_with_llm_handler(redis: AsyncRedis, config: Any, **extra: Any) -> str:
    """Announce the agent to the LLM edge handler (``keys.edge_register("llm")``)."""
    return await register_with(redis, config, "llm", **extra)


async def register_with_a2a_handler(redis: AsyncRedis, config: Any, **extra: Any) -> str:
    """Announce the agent on the agent-to-agent register (``keys.a2a_register()``)."""
    return await register_with(redis, config, "a2a", **extra)


def extract_envelope_fields(data: Any) -> dict[str, Any]:
    """The envelope's fields as a plain dict, from whatever the caller holds.

    Accepts an :class:`Envelope`, a stream entry's fields (``{b"data": ...}``,
    ``{"envelope": ...}``), the envelope JSON (str/bytes) or an envelope dict.

    :raises ValueError: the data is not an envelope (the reason is in the message).
    """
    if isinstance(data, Envelope):
        return data.to_dict()
    if isinstance(data, Mapping) and payload_of(data) is None:
        try:
            return Envelope.from_dict(dict(data)).to_dict()
        except Exception as exc:
            raise ValueError(f"not an envelope: {exc}") from exc
    raw = payload_of(data) if isinstance(data, Mapping) else data
    if not isinstance(raw, bytes | str):
        raise ValueError(f"not an envelope: {type(data).__name__}")
    env = decode_payload(raw, get_settings().bus_max_envelope_bytes)
    if isinstance(env, Malformed):
        raise ValueError(f"not an envelope ({env.reason}): {env.error}")
    return env.to_dict()
