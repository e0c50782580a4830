"""Publishing envelopes: one XADD per envelope, pipelined for batches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from core_bus.durability import Replication, check_replies, queue_wait, resolve_durability
from core_bus.envelope import Envelope
from core_bus.errors import EnvelopeTooLarge
from core_bus.keys import StreamKeyBuilder
from core_bus.log import get_logger
from core_bus.settings import get_settings
from core_bus.streams.replies import text

#: Stream entry field holding the envelope JSON (``envelope`` is accepted on read too).
DATA_FIELD = "data"
ALT_DATA_FIELD = "envelope"
DISCOVERY_MAXLEN = 10_000

# Streams this process has already announced on the discovery stream. Announcing
# once per process (not checking EXISTS per publish) keeps publish at one round
# trip; a repeated notice from another process is harmless to readers.
_announced: set[str] = set()


def encode(env: Envelope, limit: int | None = None) -> bytes:
    """Serialise an envelope, raising :class:`EnvelopeTooLarge` over the limit."""
    data = env.to_json()
    max_bytes = limit if limit is not None else get_settings().bus_max_envelope_bytes
    if len(data) > max_bytes:
        raise EnvelopeTooLarge(len(data), max_bytes)
    return data


def _xadd(target: Any, stream: str, data: bytes, maxlen: int) -> Any:
    """XADD on a client (returns the awaitable) or queue it on a pipeline."""
    if maxlen > 0:
        return target.xadd(stream, {DATA_FIELD: data}, maxlen=maxlen, approximate=True)
    return target.xadd(stream, {DATA_FIELD: data})


def _announce(pipe: Any, stream: str, keys: StreamKeyBuilder) -> bool:
    notices = keys.discovery_stream()
    if stream in _announced or stream == notices:
        return False
    pipe.xadd(notices, {"stream": stream}, maxlen=DISCOVERY_MAXLEN, approximate=True)
    return True


def _settle_notice(stream: str, result: Any) -> None:
    """After the pipeline ran: a failed notice never fails the publish that carried it.

    The entry was written; reporting an error would make callers retry and
    duplicate it. The failure (a wrong-type key, an ACL excluding the notices
    stream) is logged once and the stream is not announced again by this
    process; discovery still finds it by its periodic SCAN.
    """
    _announced.add(stream)
    if isinstance(result, Exception):
        get_logger("core_bus.publish").warning(
            "discovery_notice_failed", stream=stream, error=f"{type(result).__name__}: {result}"
        )


async def publish_envelope(
    redis: AsyncRedis,
    stream: str,
    env: Envelope,
    *,
    maxlen: int | None = None,
    keys: StreamKeyBuilder | None = None,
    durability: str | Replication | None = None,
) -> str:
    """XADD one envelope to ``stream`` and return its entry id.

    Raises :class:`EnvelopeTooLarge` before anything is written. Trims with
    approximate MAXLEN (``BUS_STREAM_MAXLEN``; 0 disables trimming).
    ``durability`` (default ``REDIS_DURABILITY``): ``"replicated"`` ends the
    same pipeline with WAIT and raises :class:`~core_bus.errors.ReplicationTimeout`
    when too few replicas confirmed (the entry was written on the master).
    """
    settings = get_settings()
    data = encode(env, settings.bus_max_envelope_bytes)
    cap = settings.bus_stream_maxlen if maxlen is None else maxlen
    policy = resolve_durability(durability)
    if stream in _announced and policy is None:
        return text(await _xadd(redis, stream, data, cap))
    pipe = redis.pipeline(transaction=False)
    _xadd(pipe, stream, data, cap)
    announced = _announce(pipe, stream, keys or StreamKeyBuilder(settings.bus_namespace))
    waits = 0 if policy is None else await queue_wait(pipe, redis, policy)
    results = await pipe.execute(raise_on_error=False)
    replies = results[len(results) - waits :] if waits else []
    if waits:
        del results[len(results) - waits :]
    if announced:
        _settle_notice(stream, results.pop())
    if isinstance(results[0], Exception):
        raise results[0]
    if policy is not None:
        check_replies(replies, policy, f"publish to {stream}")
    return text(results[0])


async def publish_many(
    redis: AsyncRedis,
    stream: str,
    envelopes: Iterable[Envelope],
    *,
    maxlen: int | None = None,
    batch_size: int = 1000,
    keys: StreamKeyBuilder | None = None,
    durability: str | Replication | None = None,
) -> list[str]:
    """XADD many envelopes to one stream with pipelines of ``batch_size``.

    Every envelope is size-checked before the first write, so a too-large one
    means nothing of the batch was written. ``durability`` as for
    :func:`publish_envelope`: one WAIT at the end of each batch's pipeline.
    """
    policy = resolve_durability(durability)
    settings = get_settings()
    limit = settings.bus_max_envelope_bytes
    payloads = [encode(env, limit) for env in envelopes]
    cap = settings.bus_stream_maxlen if maxlen is None else maxlen
    keys = keys or StreamKeyBuilder(settings.bus_namespace)
    ids: list[str] = []
    for start in range(0, len(payloads), batch_size):
        pipe = redis.pipeline(transaction=False)
        for data in payloads[start : start + batch_size]:
            _xadd(pipe, stream, data, cap)
        announced = _announce(pipe, stream, keys)
        waits = 0 if policy is None else await queue_wait(pipe, redis, policy)
        results = await pipe.execute(raise_on_error=False)
        replies = results[len(results) - waits :] if waits else []
        if waits:
            del results[len(results) - waits :]
        if announced:
            _settle_notice(stream, results.pop())
        for result in results:
            if isinstance(result, Exception):
                raise result  # entries before it in this batch were written (ids lost)
        if policy is not None:
            check_replies(replies, policy, f"publish to {stream}")
        ids.extend(text(r) for r in results)
    return ids
