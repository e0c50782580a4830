"""Exceptions raised by core_bus (one module so every layer can import them)."""


class BusError(Exception):
    """Base class of every core_bus error."""


class EnvelopeTooLarge(BusError):
    """The serialised envelope exceeds the configured size limit; nothing was written."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"envelope is {size} bytes, limit is {limit} bytes")
        self.size = size
        self.limit = limit


class RpcTimeout(BusError, TimeoutError):
    """No reply with the request's correlation id arrived in time."""


class ReplicationTimeout(BusError):
    """Fewer replicas than asked confirmed a write within the WAIT timeout.

    The write itself happened on the master and is not undone: a retry may
    duplicate it (at-least-once). ``what`` names the write (``publish``, ...).
    """

    def __init__(self, what: str, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            f"{what}: {acked} of {wanted} replica(s) confirmed within {timeout_ms} ms "
            "(the write is on the master only and may be lost on failover)"
        )
        self.what = what
        self.acked = acked
        self.wanted = wanted
        self.timeout_ms = timeout_ms
