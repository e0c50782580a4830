"""Connection and bus settings from the environment (pydantic-settings).

``REDIS_URL`` wins; otherwise the prototype's ``REDIS_HOST``/``REDIS_PORT``/
``REDIS_USERNAME``/``REDIS_PASSWORD`` are assembled. There is no default remote
host and no credential in code: the default is a local Redis.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal
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
    #: Deployment mode (``REDIS_MODE``): standalone, sentinel or cluster (see core_bus.connection).
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    #: ``REDIS_SENTINELS``: comma-separated ``host:port`` of the sentinels (sentinel mode).
    redis_sentinels: str | None = None
    #: ``REDIS_MASTER_NAME``: the name the sentinels monitor the master under.
    redis_master_name: str | None = None
    #: ``REDIS_SENTINEL_PASSWORD``: the sentinels' own password (the master's is in the URL).
    redis_sentinel_password: SecretStr | None = None
    #: ``REDIS_DURABILITY``: ``replicated`` WAITs for replicas after publishes, acks and
    #: dead letters (see core_bus.durability and docs/DELIVERY.md).
    redis_durability: Literal["none", "replicated"] = "none"
    #: ``REDIS_REPLICAS_TO_WAIT`` / ``REDIS_WAIT_TIMEOUT`` (ms): the WAIT arguments.
    redis_replicas_to_wait: int = Field(default=1, ge=1)
    redis_wait_timeout: int = Field(default=1000, ge=0)

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


def connect(
    url: str | None = None,
    *,
    mode: str | None = None,
    sentinels: str | list[str] | list[tuple[str, int]] | None = None,
    master_name: str | None = None,
    sentinel_password: str | None = None,
    **kwargs: Any,
) -> Any:
    """An asyncio Redis client for ``url`` (default: from the environment) in ``mode``.

    ``mode`` (``standalone``/``sentinel``/``cluster``), ``sentinels``,
    ``master_name`` and ``sentinel_password`` default to ``REDIS_MODE``,
    ``REDIS_SENTINELS``, ``REDIS_MASTER_NAME`` and ``REDIS_SENTINEL_PASSWORD``;
    :mod:`core_bus.connection` says what each mode returns. Health checks and
    keepalive are on so dead connections are noticed (TCP keepalive only for
    TCP: a ``unix://`` socket, as the embedded server uses, has none); the
    caller owns the client and must ``await client.aclose()``.

    :raises core_bus.connection.ConnectionConfigError: incomplete mode settings.
    """
    from core_bus.connection import connect_redis, parse_sentinels

    settings = get_settings()
    url = url or settings.url()
    mode = mode or settings.redis_mode
    if sentinels is None:
        sentinels = settings.redis_sentinels
    addresses = parse_sentinels(sentinels)
    if sentinel_password is None and settings.redis_sentinel_password is not None:
        sentinel_password = settings.redis_sentinel_password.get_secret_value()
    return connect_redis(
        url,
        mode=mode,
        sentinels=addresses,
        master_name=master_name or settings.redis_master_name,
        sentinel_password=sentinel_password,
        **kwargs,
    )
