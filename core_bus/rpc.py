"""Request/reply over streams, matched by ``correlation_id``.

The caller publishes a request whose ``reply_to`` names a stream and waits for
replies carrying the request's ``correlation_id``; every other entry on that
stream is ignored (the prototype returned the first entry, whoever it was for).

Reading replies costs one blocking connection per reply stream, not one per
call: all calls waiting on the same stream over the same client share a
:class:`_ReplyReader`. There is no background task: whichever waiting call
finds nobody reading becomes the reader for one XREAD, hands every reply to the
call it belongs to, and lets the next waiter take over when its own reply came.

When the request has no ``reply_to`` the calls of one burst share a private
stream (``keys.rpc_reply_stream(token)``), deleted as soon as no call waits on
it any more. :func:`rpc_reply` gives such streams a TTL so a reply arriving
after the caller gave up does not linger.

Timeouts: :func:`bus_rpc_call` and :func:`bus_rpc_envelope` raise
:class:`core_bus.errors.RpcTimeout` (a ``TimeoutError``) when no matching reply
arrived in time; :func:`bus_rpc_stream` simply ends.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
from redis.asyncio import Redis as AsyncRedis

from core_bus.envelope import Envelope
from core_bus.errors import RpcTimeout
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.publish import ALT_DATA_FIELD, DATA_FIELD, encode, publish_envelope
from core_bus.settings import get_settings
from core_bus.streams.blocking import blocking_ms
from core_bus.streams.errors import TRANSIENT_ERRORS
from core_bus.streams.replies import streams_of, text
from core_bus.streams.slots import xread as slot_xread

log = get_logger("core_bus.rpc")

#: Longest single XREAD BLOCK; a reader re-checks its deadline at least this often.
MAX_BLOCK_SECONDS = 2.0
#: Entries read per XREAD of a reply stream.
READ_COUNT = 500
#: TTL :func:`rpc_reply` puts on private reply streams (a safety net, seconds).
PRIVATE_STREAM_TTL = 600
#: A long-lived private stream is trimmed to the read position after this many entries.
TRIM_EVERY = 1000
#: Bound on the cleanup (DEL) done when the last waiter leaves.
CLEANUP_TIMEOUT = 5.0
#: Pause before reading again after Redis was unreachable (the reply may still come).
READ_RETRY_SECONDS = 0.25


def _keys() -> StreamKeyBuilder:
    return StreamKeyBuilder(get_settings().bus_namespace)


def _is_private(stream: str) -> bool:
    return stream.startswith(_keys().rpc_reply_stream(""))


class _Waiter:
    """Replies for one correlation id, and the event that wakes its caller."""

    __slots__ = ("items", "wake")

    def __init__(self) -> None:
        self.items: deque[Envelope] = deque()
        self.wake = anyio.Event()


class _ReplyReader:
    """Demultiplexes one reply stream (read with XREAD, no group) by correlation id."""

    def __init__(self, redis: AsyncRedis, stream: str, *, private: bool) -> None:
        self.redis = redis
        self.stream = stream
        self.private = private
        self.waiters: dict[str, _Waiter] = {}
        self.last_id: str | None = "0-0" if private else None
        self.reading = False
        self.read_since_trim = 0
        self.closed = False

    async def position(self) -> None:
        """Fix the read position before the first request goes out.

        A shared ``reply_to`` may hold old entries; starting at its current last
        id (not ``$`` at read time) means a reply that arrives before the first
        XREAD is still seen.
        """
        if self.last_id is not None:
            return
        newest = await self.redis.xrevrange(self.stream, count=1)
        last = text(newest[0][0]) if newest else "0-0"
        if self.last_id is None:
            self.last_id = last

    def register(self, correlation_id: str) -> _Waiter:
        if correlation_id in self.waiters:
            raise ValueError(f"a call with correlation_id {correlation_id!r} is already waiting")
        waiter = _Waiter()
        self.waiters[correlation_id] = waiter
        return waiter

    async def next_reply(self, waiter: _Waiter, deadline: float) -> Envelope | None:
        """The next reply for ``waiter``, or ``None`` once ``deadline`` passed."""
        while True:
            if waiter.items:
                return waiter.items.popleft()
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            if not self.reading:
                self.reading = True
                try:
                    await self._read_once(min(remaining, MAX_BLOCK_SECONDS))
                except TRANSIENT_ERRORS as exc:
                    # the request is out: keep waiting for its reply until the deadline
                    log.warning("rpc_reply_read_failed", stream=self.stream, error=repr(exc))
                    await anyio.sleep(min(READ_RETRY_SECONDS, max(0.0, remaining)))
                finally:
                    self.reading = False
                    self._wake_all()
            else:
                waiter.wake = anyio.Event()
                with anyio.move_on_after(remaining):
                    await waiter.wake.wait()

    async def _read_once(self, block_seconds: float) -> None:
        assert self.last_id is not None
        reply = await slot_xread(
            self.redis,
            {self.stream: self.last_id},
            READ_COUNT,
            blocking_ms(self.redis, block_seconds),
        )
        for _stream, entries in streams_of(reply):
            for entry_id, fields in entries:
                self.last_id = entry_id
                self._dispatch(entry_id, fields)
            self.read_since_trim += len(entries)
        if self.private and self.read_since_trim >= TRIM_EVERY:
            self.read_since_trim = 0
            await self.redis.xtrim(self.stream, minid=self.last_id, approximate=True)

    def _dispatch(self, entry_id: str, fields: dict[str, Any] | None) -> None:
        raw = None if fields is None else fields.get(DATA_FIELD, fields.get(ALT_DATA_FIELD))
        if raw is None:
            return
        try:
            env = Envelope.from_json(raw)
        except ValueError:
            log.debug("rpc_reply_malformed", stream=self.stream, entry_id=entry_id)
            return
        waiter = self.waiters.get(env.correlation_id or "")
        if waiter is not None:
            waiter.items.append(env)
            waiter.wake.set()

    def _wake_all(self) -> None:
        for waiter in self.waiters.values():
            waiter.wake.set()


# Readers in use, per client and reply stream. An entry lives only while calls wait on it.
_readers: dict[tuple[int, str], _ReplyReader] = {}
# Private reply stream of the current burst of calls, per client.
_private_streams: dict[int, str] = {}


def _acquire(redis: AsyncRedis, stream: str, *, private: bool) -> _ReplyReader:
    key = (id(redis), stream)
    reader = _readers.get(key)
    if reader is None:
        reader = _ReplyReader(redis, stream, private=private)
        _readers[key] = reader
    return reader


async def _release(reader: _ReplyReader, correlation_id: str) -> None:
    """Forget one waiter; the last one out deletes a private stream."""
    reader.waiters.pop(correlation_id, None)
    reader._wake_all()
    if reader.waiters or reader.closed:
        return
    reader.closed = True
    key = (id(reader.redis), reader.stream)
    if _readers.get(key) is reader:
        del _readers[key]
    if not reader.private:
        return
    if _private_streams.get(id(reader.redis)) == reader.stream:
        del _private_streams[id(reader.redis)]
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
        try:
            await reader.redis.delete(reader.stream)
        except Exception as exc:  # cleanup is best effort; the TTL is the net
            log.warning("rpc_reply_stream_cleanup_failed", stream=reader.stream, error=str(exc))


def _reply_stream_for(redis: AsyncRedis, request_env: Envelope) -> tuple[str, bool]:
    if request_env.reply_to:
        return request_env.reply_to, _is_private(request_env.reply_to)
    stream = _private_streams.get(id(redis))
    if stream is None or (id(redis), stream) not in _readers:
        stream = _keys().rpc_reply_stream(uuid.uuid4().hex)
        _private_streams[id(redis)] = stream
    return stream, True


async def _start_call(
    redis: AsyncRedis, target_stream: str, request_env: Envelope
) -> tuple[_ReplyReader, str, _Waiter]:
    """Register the waiter, fix the read position, then publish the request."""
    if not request_env.correlation_id:
        request_env.correlation_id = str(uuid.uuid4())
    correlation_id = request_env.correlation_id
    stream, private = _reply_stream_for(redis, request_env)
    request_env.reply_to = stream
    reader = _acquire(redis, stream, private=private)
    waiter = reader.register(correlation_id)
    try:
        await reader.position()
        await publish_envelope(redis, target_stream, request_env)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _release(reader, correlation_id)
        raise
    log.debug(
        "rpc_request_sent", stream=target_stream, reply_to=stream, correlation_id=correlation_id
    )
    return reader, correlation_id, waiter


async def bus_rpc_call(
    redis: AsyncRedis,
    target_stream: str,
    request_env: Envelope,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> Envelope:
    """Publish ``request_env`` to ``target_stream`` and return the matching reply.

    Sets ``correlation_id`` when missing and, when ``reply_to`` is empty, a
    private reply stream (deleted afterwards); both are written into
    ``request_env``. Entries on the reply stream with another correlation id are
    ignored.

    :raises RpcTimeout: no reply with this correlation id within ``timeout`` seconds.
    """
    deadline = anyio.current_time() + timeout
    reader, correlation_id, waiter = await _start_call(redis, target_stream, request_env)
    try:
        reply = await reader.next_reply(waiter, deadline)
    finally:
        await _release(reader, correlation_id)
    if reply is None:
        raise RpcTimeout(
            f"no reply with correlation_id {correlation_id} on {reader.stream} "
            f"within {timeout:g}s (request sent to {target_stream})"
        )
    return reply


async def bus_rpc_envelope(
    redis: AsyncRedis,
    target_inbox: str,
    request_envelope: Envelope,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> Envelope:
    """The prototype's name for :func:`bus_rpc_call` (it also returned the reply Envelope).

    Unlike the prototype it raises :class:`RpcTimeout` instead of returning ``None``.
    """
    return await bus_rpc_call(redis, target_inbox, request_envelope, timeout)


async def bus_rpc_stream(
    redis: AsyncRedis,
    target_stream: str,
    request_env: Envelope,
    timeout: float = 5.0,  # noqa: ASYNC109 (prototype API; also an idle timeout)
    max_responses: int = 10,
) -> AsyncIterator[Envelope]:
    """Publish ``request_env`` and yield every matching reply as it arrives.

    Ends quietly after ``max_responses`` replies or when no reply arrived for
    ``timeout`` seconds (the number of replies is up to the server, so running
    out is not an error). Leave the loop early with ``break`` inside
    ``async with contextlib.aclosing(...)`` so the reply stream is released at once.
    """
    reader, correlation_id, waiter = await _start_call(redis, target_stream, request_env)
    try:
        for _ in range(max_responses):
            reply = await reader.next_reply(waiter, anyio.current_time() + timeout)
            if reply is None:
                return
            yield reply
    finally:
        await _release(reader, correlation_id)


def rpc_request(
    role: str = "user",
    content: Any = None,
    *,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    **fields: Any,
) -> Envelope:
    """Build a request envelope with a fresh ``correlation_id`` (other fields as Envelope)."""
    return Envelope(
        role=role,
        content=content,
        reply_to=reply_to,
        correlation_id=correlation_id or str(uuid.uuid4()),
        envelope_type=fields.pop("envelope_type", "rpc_request"),
        **fields,
    )


async def rpc_reply(redis: AsyncRedis, request_env: Envelope, reply_env: Envelope) -> str:
    """Serving side: send ``reply_env`` to ``request_env.reply_to`` and return its entry id.

    The reply gets the request's ``correlation_id``. Private reply streams get a
    TTL in the same round trip so they vanish even if their caller has gone.

    :raises ValueError: the request has no ``reply_to``.
    """
    if not request_env.reply_to:
        raise ValueError("the request has no reply_to: nowhere to reply")
    reply_env.correlation_id = request_env.correlation_id
    stream = request_env.reply_to
    if not _is_private(stream):
        return await publish_envelope(redis, stream, reply_env)
    data = encode(reply_env)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(stream, {DATA_FIELD: data}, maxlen=get_settings().bus_stream_maxlen or None)
        pipe.expire(stream, PRIVATE_STREAM_TTL)
        results = await pipe.execute()
    return text(results[0])
