"""Undecodable input never escapes the decode path, and a subscription dead-letters it once.

The fuzz part (hypothesis, bounded in examples and time) throws arbitrary bytes,
text, deep nesting and JSON-ish values at :func:`decode_payload`: it must
return an Envelope or a Malformed with a reason, never raise.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_bus import DeadLetter, Envelope, StreamKeyBuilder, publish_envelope, subscribe
from core_bus.consume.decode import Malformed, decode_payload
from core_bus.streams.deadletter import REASON_BAD_JSON
from core_bus.streams.replies import entries_of
from tests.waiting import eventually

LIMIT = 128 * 1024
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def deep_envelope(depth: int = 1000) -> bytes:
    return ('{"role": "user", "content": ' + deep(depth) + "}").encode()


def test_thousand_deep_json_is_malformed_not_an_exception() -> None:
    result = decode_payload(deep_envelope(), LIMIT)
    assert isinstance(result, Malformed)
    assert result.reason == REASON_BAD_JSON and "RecursionError" in result.error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=512) | st.text(max_size=512))
def test_fuzz_arbitrary_bytes_and_text(raw: bytes | str) -> None:
    result = decode_payload(raw, LIMIT)
    assert isinstance(result, Envelope | Malformed)


@pytest.mark.timeout(60)
@FUZZ
@given(json_values, st.integers(min_value=0, max_value=3000), st.sampled_from("[{"))
def test_fuzz_json_values_and_nesting(value: Any, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = deep(depth, opener, closer) if opener == "[" else '{"a":' * depth + "1" + "}" * depth
    for raw in (
        json.dumps(value),
        json.dumps({"role": "user", "content": value}),
        '{"role": "user", "content": ' + nested + "}",
        nested,
        nested[: len(nested) // 2],  # truncated
    ):
        result = decode_payload(raw, LIMIT)
        assert isinstance(result, Envelope | Malformed)
        result_b = decode_payload(raw.encode(), LIMIT)
        assert type(result_b) is type(result)
    del closer


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_deep_json_entry_is_dead_lettered_once_and_worker_keeps_going(redis: Any) -> None:
    """A 1,000-deep envelope among healthy ones: one dead letter (malformed), the rest handled."""
    stream = "AG1:agent:deep:inbox"
    seen: list[Any] = []

    async def handler(env: Envelope) -> None:
        seen.append(env.content)

    await publish_envelope(redis, stream, Envelope(role="user", content=1))
    bad_id = await redis.xadd(stream, {"data": deep_envelope()})
    await publish_envelope(redis, stream, Envelope(role="user", content=2))
    sub = await subscribe(redis, stream, handler, group="deep", max_deliveries=3)
    try:
        await eventually(lambda: sub.stats.processed == 2 and sub.stats.dead_lettered == 1)
        assert sub.running
    finally:
        await sub.stop()
    raw = await redis.xrange(StreamKeyBuilder().dead_letter("deep"))
    letters = [DeadLetter.from_fields(i, f) for i, f in entries_of(raw) if f is not None]
    assert [(d.reason, d.source_id, d.deliveries) for d in letters] == [
        (REASON_BAD_JSON, bad_id.decode(), 1)
    ]
    assert sorted(seen) == [1, 2]
