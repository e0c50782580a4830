# ruff: noqa
# type: ignore
# A prototype subscriber script: the prototype's subscribe() ran forever; ours
# returns at once, so this closes the client under a running subscription.
import asyncio
import redis.asyncio as aioredis
from core_bus.bus import build_redis_url, subscribe

STREAM = "AG1:agent:closer:inbox"
GROUP = "closer_group"

async def handle(env, redis):
    print(f"Received: {env.content}")

async def main():
    redis = aioredis.from_url(build_redis_url())
    await subscribe(redis, STREAM, handle, GROUP)
    await redis.aclose()

asyncio.run(main())
