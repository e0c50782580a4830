"""Redis's clock: the one every host of a fleet agrees on (leases, deadlines, ages)."""

from __future__ import annotations

from typing import Any


async def redis_time_ms(redis: Any) -> int:
    """``TIME`` in milliseconds; host clocks may be skewed, this one is shared."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000
