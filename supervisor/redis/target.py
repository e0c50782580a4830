"""How the supervisor and its workers reach the configured Redis (mode, sentinels, durability).

One place turns ``[redis]`` into :func:`core_bus.settings.connect` arguments
for the supervisor's own clients and into the variables a worker reads
(``REDIS_MODE``, ``REDIS_SENTINELS``, ``REDIS_MASTER_NAME``,
``REDIS_SENTINEL_PASSWORD``, ``REDIS_DURABILITY``, ``REDIS_REPLICAS_TO_WAIT``,
``REDIS_WAIT_TIMEOUT``), so both always connect the same way. The sentinel
password reaches a worker only when the supervisor itself was given one (from
its environment), just as the Redis password travels inside ``REDIS_URL``.
"""

from __future__ import annotations

from typing import Any

from core_bus.connection import format_sentinels
from supervisor.config.models import RedisConfig


def connect_options(redis: RedisConfig) -> dict[str, Any]:
    """Keyword arguments for :func:`core_bus.settings.connect` (mode always explicit)."""
    if redis.embedded or redis.mode == "standalone":
        return {"mode": "standalone"}
    options: dict[str, Any] = {"mode": redis.mode}
    if redis.mode == "sentinel":
        options["sentinels"] = redis.sentinel_addresses()
        options["master_name"] = redis.master_name
        if redis.sentinel_password is not None:
            options["sentinel_password"] = redis.sentinel_password.get_secret_value()
    return options


def worker_redis_env(redis: RedisConfig) -> dict[str, str]:
    """The connection-mode and durability variables of every worker (secrets included)."""
    env = {
        "REDIS_MODE": "standalone" if redis.embedded else redis.mode,
        "REDIS_DURABILITY": redis.durability,
        "REDIS_REPLICAS_TO_WAIT": str(redis.replicas_to_wait),
        "REDIS_WAIT_TIMEOUT": str(max(1, round(redis.wait_timeout * 1000))),
    }
    if redis.mode == "sentinel" and not redis.embedded:
        env["REDIS_SENTINELS"] = format_sentinels(redis.sentinel_addresses())
        env["REDIS_MASTER_NAME"] = redis.master_name or ""
        if redis.sentinel_password is not None:
            env["REDIS_SENTINEL_PASSWORD"] = redis.sentinel_password.get_secret_value()
    return env
