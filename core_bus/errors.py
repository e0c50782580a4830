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
