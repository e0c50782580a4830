# ruff: noqa
# type: ignore
# A prototype follower on subscribe_simple (no consumer group), one-argument callback.
import asyncio
import redis.asyncio as aioredis
from core_bus.bus import build_redis_url, subscribe_simple

async def on_message(env):
    print(f"followed: {env.content}", flush=True)

async def main():
    redis = aioredis.from_url(build_redis_url())
    print("following", flush=True)
    try:
        await subscribe_simple(redis, "AG1:flow:demo:output", on_message)
    finally:
        await redis.aclose()

if __name__ == "__main__":
    asyncio.run(main())
