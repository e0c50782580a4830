"""Agent registration envelopes and the prototype's ``config`` objects.

The prototype's agents announce themselves to the edge handlers on a
register stream (Telegram: ``AG1:tg:register``, LLM: ``keys.edge_register("llm")``,
agent-to-agent: ``keys.a2a_register()``) with one envelope saying who they are
and where their inbox is. Their ``config`` is a dict or an object with
attributes; :class:`AgentIdentity` reads either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.envelope import Envelope
from core_bus.keys import StreamKeyBuilder, cluster_from_env
from core_bus.publish import publish_envelope
from core_bus.settings import get_settings

NAME_KEYS = ("agent_name", "name", "agent_id", "id")


def register_stream(platform: str, keys: StreamKeyBuilder) -> str:
    if platform == "tg":
        return keys.tg_register()
    if platform == "a2a":
        return keys.a2a_register()
    return keys.edge_register(platform)


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


@dataclass(frozen=True)
class AgentIdentity:
    """Who an agent is, from a name or the prototype's ``config`` (dict or object)."""

    name: str
    group: str
    inbox: str
    redis_url: str | None = None
    register: tuple[str, ...] = ("a2a",)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Any) -> AgentIdentity:
        """Read ``agent_name`` (or ``name``/``agent_id``/``id``), ``group``, ``inbox``,
        ``redis_url``, ``register`` (platforms) and ``capabilities``/``description``.

        :raises ValueError: no agent name in ``config``.
        """
        if isinstance(config, AgentIdentity):
            return config
        keys = StreamKeyBuilder(get_settings().bus_namespace, cluster=cluster_from_env())
        if isinstance(config, str):
            return cls(name=config, group=config, inbox=keys.agent_inbox(config))
        name = next((str(v) for k in NAME_KEYS if (v := _get(config, k))), None)
        if not name:
            raise ValueError(f"agent config has no name (one of {', '.join(NAME_KEYS)})")
        register = _get(config, "register")
        platforms = (register,) if isinstance(register, str) else tuple(register or ("a2a",))
        for platform in platforms:
            if not platform or not str(platform).isidentifier():
                raise ValueError(f"invalid register platform {platform!r}")
        extra = {k: v for k in ("capabilities", "description") if (v := _get(config, k))}
        return cls(
            name=name,
            group=str(_get(config, "group") or name),
            inbox=str(_get(config, "inbox") or keys.agent_inbox(name)),
            redis_url=_get(config, "redis_url"),
            register=tuple(str(p) for p in platforms),
            extra=extra,
        )

    def registration(self, platform: str, **extra: Any) -> Envelope:
        content = {"agent_name": self.name, "inbox": self.inbox, "platform": platform}
        content.update(self.extra)
        content.update(extra)
        return Envelope(
            role="system",
            envelope_type="register",
            agent_name=self.name,
            reply_to=self.inbox,
            content=content,
        )


async def register_with(redis: AsyncRedis, config: Any, platform: str, **extra: Any) -> str:
    """Publish ``config``'s registration envelope to ``platform``'s register stream; its id."""
    identity = AgentIdentity.of(config)
    keys = StreamKeyBuilder(get_settings().bus_namespace, cluster=cluster_from_env())
    stream = register_stream(platform, keys)
    return await publish_envelope(redis, stream, identity.registration(platform, **extra))
