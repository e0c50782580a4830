#!/bin/sh
# A supervised agent that is not Python: any program that speaks sd_notify will do.
#
# The supervisor starts it with AG1_AGENT, AG1_WORKER, AG1_GROUP, AG1_CONSUMER,
# AG1_STREAMS (comma separated), REDIS_URL and NOTIFY_SOCKET in its environment.
# It reports READY=1 and then WATCHDOG=1 heartbeats with systemd-notify (without
# systemd-notify the supervisor counts it ready after the agent's start_seconds),
# logs its stream's backlog when it changes (the supervisor re-emits each line as a
# log event; without redis-cli it says once that it cannot, in its STATUS= too),
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
    redis-cli -u "$REDIS_URL" XLEN "$stream" 2>/dev/null || echo "?"
}

# Its job is to watch its stream's backlog; it needs redis-cli for that (the
# no-Redis quickstart has none). Without it, it says so once, in the log and in
# its STATUS= (shown by `ag1-fleet status`), instead of logging "n/a" forever.
problem=""
if [ -z "$stream" ]; then
    problem="degraded: no stream in AG1_STREAMS to watch"
elif ! command -v redis-cli >/dev/null 2>&1; then
    problem="degraded: redis-cli not found, cannot count the backlog of $stream"
fi

if [ -n "$problem" ]; then
    notify --ready --status="$problem"
    echo "$worker: ready (pid $$), $problem" >&2
else
    notify --ready --status="watching $stream"
    echo "$worker: ready (pid $$, stream $stream)"
fi

# One log line when the backlog changes, not one per heartbeat; the new STATUS=
# rides on the heartbeat's datagram.
last=""
while [ "$running" = 1 ]; do
    if [ -n "$problem" ]; then
        notify WATCHDOG=1
    else
        now="$(backlog)"
        if [ "$now" != "$last" ]; then
            notify WATCHDOG=1 "STATUS=watching $stream: $now entries"
            echo "$worker: $stream holds $now entries"
            last="$now"
        else
            notify WATCHDOG=1
        fi
    fi
    sleep "$interval" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null
    sleeper=""
done

echo "$worker: SIGTERM received, exiting"
exit 0
