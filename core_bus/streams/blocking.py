"""The one rule for blocking reads: BLOCK always ends before the client's socket timeout.

redis-py gives clients a socket timeout (5 s by default in redis-py 8); a
blocking XREAD/XREADGROUP that outlasts it fails with ``TimeoutError`` and
every idle read would look like a lost connection.
"""

from __future__ import annotations

from redis.asyncio import Redis as AsyncRedis

#: Fraction of the socket timeout a BLOCK may use (room for the reply to arrive).
SOCKET_TIMEOUT_SHARE = 0.5


def blocking_ms(redis: AsyncRedis, wanted_seconds: float) -> int:
    """BLOCK milliseconds for ``wanted_seconds``, capped below ``redis``'s socket timeout."""
    wanted_ms = max(1, int(wanted_seconds * 1000))
    pool = getattr(redis, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if kwargs is None:  # a RedisCluster: its nodes' connections share these kwargs
        kwargs = getattr(redis, "connection_kwargs", None)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    socket_timeout = kwargs.get("socket_timeout")
    if isinstance(socket_timeout, int | float) and socket_timeout > 0:
        wanted_ms = min(wanted_ms, max(1, int(socket_timeout * 1000 * SOCKET_TIMEOUT_SHARE)))
    return wanted_ms
