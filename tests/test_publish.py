"""publish_envelope / publish_many against a real redis-server."""

from __future__ import annotations

from typing import Any

import pytest

from core_bus import Envelope, EnvelopeTooLarge, StreamKeyBuilder, publish_envelope, publish_many
from core_bus.publish import _announced
from core_bus.streams.replies import entries_of, text

pytestmark = pytest.mark.anyio


async def test_publish_returns_id_and_announces_once(redis: Any) -> None:
    """The first publish of a stream writes one discovery notice; later ones do not."""
    _announced.discard("AG1:agent:t1:inbox")
    kb = StreamKeyBuilder()
    first = await publish_envelope(redis, kb.agent_inbox("t1"), Envelope(role="user", content=1))
    await publish_envelope(redis, kb.agent_inbox("t1"), Envelope(role="user", content=2))
    assert "-" in first
    entries = entries_of(await redis.xrange(kb.agent_inbox("t1")))
    assert [Envelope.from_json(f["data"]).content for _, f in entries] == [1, 2]
    notices = entries_of(await redis.xrange(kb.discovery_stream()))
    assert [text(f["stream"]) for _, f in notices] == [kb.agent_inbox("t1")]


async def test_size_guard_writes_nothing(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_MAX_ENVELOPE_BYTES", "1024")
    from core_bus.settings import get_settings

    get_settings.cache_clear()
    big = Envelope(role="user", content="x" * 2000)
    with pytest.raises(EnvelopeTooLarge):
        await publish_envelope(redis, "AG1:agent:big:inbox", big)
    with pytest.raises(EnvelopeTooLarge):
        await publish_many(redis, "AG1:agent:big:inbox", [Envelope(role="user"), big])
    assert await redis.exists("AG1:agent:big:inbox") == 0


async def test_publish_many_pipelines_and_trims(redis: Any) -> None:
    envs = [Envelope(role="user", content=i) for i in range(2500)]
    ids = await publish_many(redis, "AG1:agent:many:inbox", envs, maxlen=1000, batch_size=700)
    assert len(ids) == 2500 and len(set(ids)) == 2500
    length = await redis.xlen("AG1:agent:many:inbox")
    assert 1000 <= length < 2500  # approximate MAXLEN keeps a little extra
