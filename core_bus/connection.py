"""Building a client for one of Redis's deployment modes: standalone, Sentinel, Cluster.

Everything in core_bus and the supervisor connects through :func:`connect_redis`
(re-exported as :func:`core_bus.settings.connect`, which fills the defaults
from the environment), so a fleet switches modes by configuration only:

- ``standalone``: ``redis.asyncio.Redis`` for the URL.
- ``sentinel``: a master client from ``redis.asyncio.sentinel.Sentinel``; the
  URL only supplies the master's credentials, database and TLS (its host is
  not used). Each new connection asks the sentinels for the master, so after a
  failover the next reconnect lands on the new one; a reply ``READONLY`` (a
  connection still open to a demoted master) drops that connection and raises
  ``ConnectionError``, which every loop treats as transient, and every
  reconnect (also of a single-connection client) asks the sentinels again
  (``tests/test_sentinel.py`` pins both). Closing the client closes the
  sentinel connections too.
- ``cluster``: ``redis.asyncio.cluster.RedisCluster`` with the URL as a seed node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

RedisMode = Literal["standalone", "sentinel", "cluster"]
REDIS_MODES: tuple[str, ...] = get_args(RedisMode)

#: What every client gets unless the caller overrides it: dead connections are noticed.
BASE_OPTIONS: dict[str, Any] = {"health_check_interval": 30, "socket_connect_timeout": 5}
#: Options that only a TCP socket accepts (the embedded server listens on a unix socket).
TCP_ONLY = ("socket_keepalive", "socket_keepalive_options")


#: How Redis answers a blocked client when its server turns into a replica.
DEMOTED_UNBLOCK = "UNBLOCKED force unblock"


class ConnectionConfigError(ValueError):
    """The mode's settings are incomplete or contradict each other."""


def parse_sentinels(
    value: str | Iterable[str] | Iterable[tuple[str, int]] | None,
) -> list[tuple[str, int]]:
    """``"h1:26379,h2:26379"`` or ``["h1:26379", ...]`` as ``[(host, port), ...]``
    (pairs pass through).

    :raises ConnectionConfigError: for an entry without a valid port.
    """
    if value is None:
        return []
    items: list[Any] = value.split(",") if isinstance(value, str) else list(value)
    out: list[tuple[str, int]] = []
    for item in items:
        if isinstance(item, tuple):
            out.append((str(item[0]), int(item[1])))
            continue
        text = item.strip()
        if not text:
            continue
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConnectionConfigError(f"invalid sentinel address {text!r}: expected host:port")
        out.append((host, int(port)))
    return out


def format_sentinels(sentinels: Sequence[tuple[str, int]]) -> str:
    """The inverse of :func:`parse_sentinels` (what ``REDIS_SENTINELS`` holds)."""
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sentinels)


def connect_redis(
    url: str,
    *,
    mode: str = "standalone",
    sentinels: Sequence[tuple[str, int]] = (),
    master_name: str | None = None,
    sentinel_password: str | None = None,
    **kwargs: Any,
) -> Any:
    """A client for ``url`` in ``mode`` with keepalive and health checks on.

    The caller owns it and must ``await client.aclose()``.

    :raises ConnectionConfigError: unknown mode, or sentinel mode without
        sentinels or master name, or a unix socket URL outside standalone mode.
    """
    if mode not in REDIS_MODES:
        raise ConnectionConfigError(
            f"unknown Redis mode {mode!r}: expected one of {', '.join(REDIS_MODES)}"
        )
    options = dict(BASE_OPTIONS)
    unix = url.startswith("unix:")
    if not unix:
        options["socket_keepalive"] = True
    options.update(kwargs)
    if unix:
        if mode != "standalone":
            raise ConnectionConfigError(f"a unix socket URL needs mode standalone, not {mode}")
        for name in TCP_ONLY:
            options.pop(name, None)
    if mode == "sentinel":
        return _sentinel_master(url, sentinels, master_name, sentinel_password, options)
    if mode == "cluster":
        from redis.asyncio.cluster import RedisCluster

        # RedisCluster has no per-node health checks; the other options pass through.
        # nor single-connection mode or retry_on_timeout (a TypeError otherwise).
        for name in ("health_check_interval", "single_connection_client", "retry_on_timeout"):
            options.pop(name, None)
        return RedisCluster.from_url(url, **options)
    return AsyncRedis.from_url(url, **options)


class _ResolvingConnection(SentinelManagedConnection):
    """A sentinel-managed connection that asks the sentinels again on *every* reconnect.

    redis-py 8.1 reconnects a dropped connection from ``send_packed_command``
    straight to its last host and port, skipping the sentinel lookup that
    ``connect()`` does; a single-connection client (the subscription's reader)
    then comes back to the demoted master, gets READONLY, drops, and loops
    there for ever (``tests/test_sentinel.py`` pins this). Here any connect
    not given an address by ``connect_to`` resolves the master first.
    """

    _addressed = False

    async def connect_to(self, address: Any) -> None:
        self._addressed = True
        await super().connect_to(address)  # type: ignore[no-untyped-call]

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and not self._addressed and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        self._addressed = False
        await super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """A blocked command on a master being demoted is answered ``UNBLOCKED force
        unblock ... (master -> replica?)``: like READONLY, drop the connection and raise
        ``ConnectionError`` so the caller backs off and reconnects to the new master."""
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith(DEMOTED_UNBLOCK) or not self.connection_pool.is_master:
                raise
            await self.disconnect()
            raise RedisConnectionError("the master was demoted under a blocked read") from exc


class _ResolvingSSLConnection(_ResolvingConnection, SSLConnection):
    pass


class _OwningSentinelPool(SentinelConnectionPool):
    """A master pool that also closes its sentinel connections when it is closed.

    redis-py leaves the :class:`Sentinel` (one client per sentinel) to the
    caller; here the client returned by :func:`connect_redis` is the only
    handle, so closing it must release everything.
    """

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def _sentinel_master(
    url: str,
    sentinels: Sequence[tuple[str, int]],
    master_name: str | None,
    sentinel_password: str | None,
    options: dict[str, Any],
) -> AsyncRedis:
    if not sentinels:
        raise ConnectionConfigError("sentinel mode needs at least one sentinel (host:port)")
    if not master_name:
        raise ConnectionConfigError("sentinel mode needs the master name")
    master_options = {**options, **_url_credentials(url)}
    sentinel_options = {
        k: v for k, v in options.items() if k.startswith("socket_") or k == "health_check_interval"
    }
    if sentinel_password:
        sentinel_options["password"] = sentinel_password
    if master_options.get("ssl"):
        sentinel_options["ssl"] = True
    manager = Sentinel(list(sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    connection_class = (
        _ResolvingSSLConnection if master_options.pop("ssl", False) else (_ResolvingConnection)
    )
    client: AsyncRedis = manager.master_for(
        master_name,
        connection_pool_class=_OwningSentinelPool,
        connection_class=connection_class,
        **master_options,
    )
    return client


def _url_credentials(url: str) -> dict[str, Any]:
    """Username, password, database and TLS of a ``redis://`` / ``rediss://`` URL."""
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password is not None:
        out["password"] = unquote(parts.password)
    db = parts.path.lstrip("/")
    if db.isdigit():
        out["db"] = int(db)
    if parts.scheme == "rediss":
        out["ssl"] = True
    return out


def describe_target(
    url: str, mode: str, sentinels: Sequence[tuple[str, int]] = (), master_name: str | None = None
) -> str:
    """How a log line or ``ag1-bus`` names the Redis in use (no password)."""
    from core_bus.settings import redact_url

    if mode == "sentinel":
        return f"sentinel master {master_name!r} via {format_sentinels(sentinels)}"
    if mode == "cluster":
        return f"cluster (seed {redact_url(url)})"
    return redact_url(url)
