# ruff: noqa
# type: ignore
# README_advanced.md, "Dynamic Discovery & Subscription": the function verbatim,
# then the smallest program around it in the guide's own shapes (its handler
# shape of section 2, the `finally: await redis.aclose()` of section 3).
from core_bus.bus import subscribe
from core_bus.keys import StreamKeyBuilder
import asyncio

async def dynamic_subscribe(redis, pattern, handler, group="agent_group", poll_delay=5):
    subscribed = set()
    while True:
        cursor = "0"
        while True:
            cursor, keys = await redis.scan(cursor=cursor, match=pattern)
            for key in keys:
                if isinstance(key, bytes):
                    key = key.decode()
                if key not in subscribed:
                    await subscribe(redis, key, handler, group)
                    subscribed.add(key)
            if cursor == "0":
                break
        await asyncio.sleep(poll_delay)

# --- the program around it -------------------------------------------------
import redis.asyncio as aioredis
from core_bus.bus import build_redis_url

async def handler(env, redis):
    try:
        print(f"handled {env.user_id}: {env.content}", flush=True)
    except Exception as e:
        print(f"[ERROR] Failed to process envelope: {e}")

async def main():
    redis = aioredis.from_url(build_redis_url())
    try:
        await dynamic_subscribe(redis, StreamKeyBuilder().user_inbox("*"), handler)
    finally:
        await redis.aclose()

if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
