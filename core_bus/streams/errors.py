"""The one definition of "Redis is unreachable right now" for every reader and writer.

Everything that talks to Redis in a loop (subscriptions, ordered shards, acks,
dead letters, RPC, tail, discovery, the supervisor's rebalancer) backs off and
retries on these and only these; anything else is a bug or a configuration
error and surfaces. A failover shows up as READONLY (a demoted master),
MASTERDOWN, TRYAGAIN, CLUSTERDOWN or (for a blocked read on the demoted master)
UNBLOCKED force unblock, a restart as LOADING (BusyLoadingError is
a ConnectionError), a pause or a slow server as a timeout.
"""

from __future__ import annotations

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
    ConnectionError,
    TimeoutError,
    OSError,
)

#: Error prefixes redis-py passes through as a plain ResponseError (inside a
#: pipeline's combined error too) that still mean "try again soon".
_TRANSIENT_PREFIXES = (
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    # A blocked XREADGROUP on a master being demoted (Sentinel/Cluster failover):
    # "UNBLOCKED force unblock from blocking operation, instance state changed".
    "UNBLOCKED force unblock",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that mean "back off and retry", also when a pipeline wrapped them."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, ResponseError) and _message(exc).startswith(_TRANSIENT_PREFIXES)


def is_nogroup(exc: BaseException) -> bool:
    """The group (or its stream) is gone: Redis lost its data or someone deleted it.

    Recognised also inside a pipeline error ("Command # 1 (XPENDING ...) of
    pipeline caused error: NOGROUP ...").
    """
    return isinstance(exc, ResponseError) and _message(exc).startswith("NOGROUP")


def _message(exc: ResponseError) -> str:
    """The server's error text, without redis-py's pipeline prefix."""
    message = str(exc)
    marker = "caused error: "
    at = message.find(marker)
    if at < 0:
        return message
    # redis-py's cluster pipeline shows the server's reply as a tuple: ("NOGROUP ...",)
    return message[at + len(marker) :].lstrip("(\"'")
