"""Connection and bus settings from the environment (pydantic-settings).

``REDIS_URL`` wins; otherwise the prototype's ``REDIS_HOST``/``REDIS_PORT``/
``REDIS_USERNAME``/``REDIS_PASSWORD`` are assembled. There is no default remote
host and no credential in code: the default is a local Redis.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MAX_ENVELOPE_BYTES = 128 * 1024


class BusSettings(BaseSettings):
    """Environment-driven settings shared by the library and the CLIs."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    redis_url: SecretStr | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_db: int = 0
    bus_stream_maxlen: int = Field(default=100_000, ge=0)
    bus_max_envelope_bytes: int = Field(default=DEFAULT_MAX_ENVELOPE_BYTES, gt=0)
    bus_namespace: str = "AG1"

    def url(self) -> str:
        """The Redis URL to connect to (contains the password: never log it)."""
        if self.redis_url is not None and self.redis_url.get_secret_value():
            return self.redis_url.get_secret_value()
        password = self.redis_password.get_secret_value() if self.redis_password else None
        return _assemble_url(
            self.redis_host, self.redis_port, self.redis_username, password, self.redis_db
        )

    def redacted_url(self) -> str:
        return redact_url(self.url())


def _assemble_url(
    host: str, port: int, username: str | None, password: str | None, db: int = 0
) -> str:
    auth = ""
    if username or password:
        auth = quote(username or "", safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"redis://{auth}{host}:{port}/{db}"


@lru_cache(maxsize=1)
def get_settings() -> BusSettings:
    """Settings read once per process (call ``get_settings.cache_clear()`` to re-read)."""
    return BusSettings()


def build_redis_url(
    host: str | None = None,
    port: int | None = None,
    username: str | None = None,
    password: str | None = None,
) -> str:
    """The prototype's helper: a Redis URL from arguments, falling back to the environment."""
    settings = BusSettings()
    if host is None and port is None and username is None and password is None:
        return settings.url()
    env_password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return _assemble_url(
        host or settings.redis_host,
        port or settings.redis_port,
        username if username is not None else settings.redis_username,
        password if password is not None else env_password,
        settings.redis_db,
    )


def redact_url(url: str) -> str:
    """Replace the password in a URL with ``***`` so it can be logged.

    Both places redis-py reads a password from are covered: the userinfo
    (``redis://:pw@host``, ``unix://:pw@/path/redis.sock``) and the query
    (``unix:///path/redis.sock?password=pw``).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]  # as written: keeps IPv6 brackets and the port
        netloc = f"{user}:***@{host}"
    query = _redact_query(parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    # by hand: urlunsplit drops the empty authority of unix:///path
    tail = (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def _redact_query(query: str) -> str:
    """``password=...`` query parameters replaced by ``password=***``."""
    if "password" not in query.lower():
        return query
    pairs = []
    for pair in query.split("&"):
        name, sep, _value = pair.partition("=")
        pairs.append(f"{name}=***" if sep and name.lower() == "password" else pair)
    return "&".join(pairs)


def connect(url: str | None = None, mode: str | None = None, **kwargs: Any) -> Any:
    """An asyncio Redis client for ``url`` (default: from the environment).

    ``mode="cluster"`` (default: ``REDIS_MODE``) returns a
    ``redis.asyncio.cluster.RedisCluster`` seeded from ``url``.

    Health checks and keepalive are on so dead connections are noticed (TCP
    keepalive only for TCP: a ``unix://`` socket, as the embedded server uses,
    has none); the caller owns the client and must ``await client.aclose()``.
    """
    import redis.asyncio as redis_asyncio

    url = url or get_settings().url()
    options: dict[str, Any] = {"health_check_interval": 30, "socket_connect_timeout": 5}
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True
    options.update(kwargs)
    if url.startswith("unix:"):
        options.pop("socket_keepalive", None)
        options.pop("socket_keepalive_options", None)
    if (mode or os.environ.get("REDIS_MODE", "")).strip().lower() == "cluster":
        from redis.asyncio.cluster import RedisCluster

        for unsupported in ("single_connection_client", "retry_on_timeout"):
            options.pop(unsupported, None)
        return RedisCluster.from_url(url, **options)
    return redis_asyncio.Redis.from_url(url, **options)
