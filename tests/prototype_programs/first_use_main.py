# ruff: noqa
# type: ignore
# The prototype's first-use main program, verbatim (issue 11). Redis settings come
# from the environment (REDIS_URL), as build_redis_url() reads them.
from core_bus.agent_bus_minimal import start_bus_subscriptions
from core_bus.keys import StreamKeyBuilder
from core_bus.bus import build_redis_url, publish_envelope
import redis.asyncio as aioredis

async def handle_bus_envelope(env, redis):
    print(f"Received envelope: {env}")
    if env.reply_to:
        await publish_envelope(redis, env.reply_to, env)

async def main():
    redis = aioredis.from_url(build_redis_url())
    kb = StreamKeyBuilder()
    patterns = [kb.agent_inbox("*"), kb.flow_input("*")]
    async def handler_with_redis(env):
        await handle_bus_envelope(env, redis)
    await start_bus_subscriptions(redis=redis, patterns=patterns, group="my_agent_group",
                                  handler=handler_with_redis)

if __name__ == "__main__":
    import asyncio
    asyncio.run(main())
