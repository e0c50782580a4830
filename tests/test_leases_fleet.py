"""Entries under a running handler are leased; a paused worker drops what was swept from it.

End to end (issue 13): real supervisor with a short ``claim_idle`` and a fast sweep.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from core_bus import Envelope, publish_many
from tests.fleet_harness import agent, agent_toml, fleet_toml, running, worker
from tests.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(120)]

INBOX = "AG1:agent:lease:inbox"

HANDLER = """
import anyio


async def handle(env, redis):
    await redis.rpush("lease:runs", str(env.content))
    await anyio.sleep(3.0 if env.content == "long" else 0.3)
    await redis.sadd("lease:done", str(env.content))
"""


def _toml(redis_url: str, **settings: Any) -> str:
    return fleet_toml(
        agent_toml(
            "lease",
            handler="lease_agent:handle",
            replicas=2,
            stop_timeout="2s",
            claim_idle="1s",
            sweep_interval="200ms",
            handler_timeout="30s",
            **settings,
        ),
        url=redis_url,
    )


async def runs(redis: Any) -> Counter[str]:
    return Counter(v.decode() for v in await redis.lrange("lease:runs", 0, -1))


async def test_long_handler_is_processed_exactly_once_under_short_claim_idle(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """A handler 3x longer than claim_idle (the 20-minute handler under claim_idle 5s, on a
    shorter timescale): the sweep never steals it from its live worker; it runs once."""
    (tmp_path / "lease_agent.py").write_text(HANDLER)
    async with running(tmp_path, _toml(redis_url)) as daemon:
        await eventually(lambda: agent(daemon, "lease").ready_replicas == 2, timeout=30)
        await publish_many(redis, INBOX, [Envelope(role="user", content="long")])
        await eventually(lambda: redis.sismember("lease:done", "long"), timeout=20)
        await eventually(
            lambda: _pending_is(redis, 0), timeout=10, message="acked by its one runner"
        )
        assert await runs(redis) == Counter({"long": 1})
        assert agent(daemon, "lease").reclaimed_by_reason.get("idle", 0) == 0


async def test_worker_resumed_after_sigstop_does_not_rerun_swept_entries(
    tmp_path: Path, redis: Any, redis_url: str
) -> None:
    """SIGSTOP a worker holding queued entries; the sweep gives them to its sibling; after
    SIGCONT the worker checks ownership first and drops them: no queued entry runs twice
    (on the old code every swept entry ran again)."""
    (tmp_path / "lease_agent.py").write_text(HANDLER)
    async with running(tmp_path, _toml(redis_url, concurrency=1)) as daemon:
        await eventually(lambda: agent(daemon, "lease").ready_replicas == 2, timeout=30)
        paused = worker(daemon, "lease", 0)
        assert paused.pid is not None and paused.consumer is not None
        n = 0
        while n < 200 and await _pending_of(redis, paused.consumer) < 4:
            await publish_many(
                redis, INBOX, [Envelope(role="user", content=n + i) for i in range(10)]
            )
            n += 10
            await eventually(lambda n=n: _acked_or_pending(redis, n), timeout=15)
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            await eventually(
                lambda: _scard_is(redis, "lease:done", n - 1),
                timeout=60,
                message="the paused worker's entries done by the sibling",
            )
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        await eventually(
            lambda: agent(daemon, "lease").messages.lost >= 1,
            timeout=15,
            message="the resumed worker noticed what it lost",
        )
        await eventually(lambda: _scard_is(redis, "lease:done", n), timeout=15)
        await eventually(lambda: _pending_is(redis, 0), timeout=15)
        counts = await runs(redis)
        assert len(counts) == n
        # Only the handler that was running at SIGSTOP may have run twice (the sweep gave
        # its entry to the sibling while it was paused mid-run); no queued entry did.
        assert len([k for k, v in counts.items() if v > 1]) <= 1, counts
        assert worker(daemon, "lease", 0).pid == paused.pid  # nobody was killed


async def _pending_is(redis: Any, n: int) -> bool:
    return int((await redis.xpending(INBOX, "lease"))["pending"]) == n


async def _pending_of(redis: Any, consumer: str) -> int:
    rows = await redis.xpending_range(INBOX, "lease", "-", "+", 1000, consumername=consumer)
    return len(rows)


async def _acked_or_pending(redis: Any, n: int) -> bool:
    return int(await redis.xlen(INBOX)) == n


async def _scard_is(redis: Any, key: str, n: int) -> bool:
    return int(await redis.scard(key)) >= n
