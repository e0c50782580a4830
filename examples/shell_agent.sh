#!/bin/sh
# A supervised agent that is not Python: any program that speaks sd_notify will do.
#
# The supervisor starts it with AG1_AGENT, AG1_WORKER, AG1_GROUP, AG1_CONSUMER,
# AG1_STREAMS (comma separated), REDIS_URL and NOTIFY_SOCKET in its environment.
# It reports READY=1 and then WATCHDOG=1 heartbeats with systemd-notify (without
# systemd-notify the supervisor counts it ready after the agent's start_seconds),
# logs one line every few seconds (the supervisor re-emits it as a log event),
# and exits 0 promptly on SIGTERM.
#
#   fleet.toml:  command = ["sh", "examples/shell_agent.sh"]
#   env:         SHELL_AGENT_INTERVAL=5   seconds between heartbeats/log lines

set -u

worker="${AG1_WORKER:-shell-agent}"
interval="${SHELL_AGENT_INTERVAL:-5}"
streams="${AG1_STREAMS:-}"
stream="${streams%%,*}"
running=1
sleeper=""

on_term() {
    running=0
    [ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null
}
trap on_term TERM INT

notify() {
    # No --no-block: systemd-notify then waits until the supervisor has read the
    # message (BARRIER=1), so it is still alive when its sender pid is checked.
    if [ -n "${NOTIFY_SOCKET:-}" ] && command -v systemd-notify >/dev/null 2>&1; then
        systemd-notify "$@" 2>/dev/null || true
    fi
}

backlog() {
    if [ -n "${REDIS_URL:-}" ] && [ -n "$stream" ] && command -v redis-cli >/dev/null 2>&1; then
        redis-cli -u "$REDIS_URL" XLEN "$stream" 2>/dev/null || echo "?"
    else
        echo "n/a"
    fi
}

notify --ready --status="watching ${stream:-nothing}"
echo "$worker: ready (pid $$, stream ${stream:-none})"

while [ "$running" = 1 ]; do
    notify WATCHDOG=1
    echo "$worker: alive, ${stream:-no stream} holds $(backlog) entries"
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null
    sleeper=""
done

echo "$worker: SIGTERM received, exiting"
exit 0
