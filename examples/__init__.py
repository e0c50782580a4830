"""Example agents for ``fleet.example.toml``: small, readable uses of the AG1 bus.

Each Python agent is one ``async def handle(env, redis)`` run by the built-in
worker (``handler = "examples.echo:handle"``); ``shell_agent.sh`` shows that
any program speaking sd_notify can be a supervised agent.
"""
