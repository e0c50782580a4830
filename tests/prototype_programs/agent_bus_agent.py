# ruff: noqa
# type: ignore
# A prototype agent on subscribe_agent_bus: registers, answers on reply_to.
import asyncio
from core_bus.agent_bus_minimal import Envelope, publish_envelope, subscribe_agent_bus

config = {"agent_name": "proto_echo", "register": ["a2a", "tg"]}

async def handle_bus_envelope(env, redis):
    if env.reply_to:
        reply = Envelope(role="agent", agent_name="proto_echo", content=f"echo: {env.content}",
                         correlation_id=env.correlation_id)
        await publish_envelope(redis, env.reply_to, reply)

if __name__ == "__main__":
    asyncio.run(subscribe_agent_bus(config, handle_bus_envelope))
