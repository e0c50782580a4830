"""The built-in worker runtime: ``python -m supervisor.worker``.

Everything comes from the environment the supervisor sets (AG1_AGENT,
AG1_HANDLER, AG1_STREAMS, AG1_GROUP, AG1_CONSUMER, REDIS_URL, NOTIFY_SOCKET
...; REDIS_MODE, REDIS_SENTINELS, REDIS_MASTER_NAME, REDIS_DURABILITY are read by
``core_bus.settings.connect`` and the subscription, so the worker connects in the
fleet's mode). The worker imports the handler (with AG1_WORKING_DIR on ``sys.path``),
subscribes, reports READY=1 once its group exists, then sends WATCHDOG=1 with
its counters (X_AG1_STATS) from the event loop itself. SIGTERM drains
(stop reading, finish in-flight, ack) and exits 0; SIGUSR1 makes it look at
its own pending list now (the supervisor just gave it reclaimed entries);
SIGUSR2 pauses it (its supervisor is cut off from the fleet: take no entries,
ack only after an ownership re-check) until the next SIGUSR1.

Exit codes: 0 after a drain, 3 when the handler cannot be imported (a boot
failure the supervisor does not retry forever), 1 on any other error.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from redis.asyncio import Redis as AsyncRedis

#: Exit code when the supervisor that spawned us is already gone at start.
EXIT_ORPHANED = 4


def arm_parent_death_signal(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """PR_SET_PDEATHSIG=SIGKILL, set by the worker itself, first thing.

    The supervisor spawns the built-in worker without a preexec_fn (so Python
    can use vfork: ~0.3 ms instead of a full fork of the daemon), and passes
    its pid in AG1_SUPERVISOR_PID; if it died before we armed the signal, our
    parent pid already differs and we leave at once.
    """
    expected = environ.get("AG1_SUPERVISOR_PID")
    if not expected or not expected.isdigit() or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() != int(expected):
        os._exit(EXIT_ORPHANED)


if __name__ == "__main__":  # before the heavy imports below (~0.3 s)
    arm_parent_death_signal()

import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402

from core_bus.keys import DEFAULT_NAMESPACE, StreamKeyBuilder, cluster_from_env  # noqa: E402
from core_bus.log import configure_logging, get_logger  # noqa: E402
from core_bus.streams.patterns import is_pattern  # noqa: E402
from supervisor.runtime.sdnotify import Notifier  # noqa: E402

EXIT_BOOT_FAILURE = 3


def _log() -> Any:
    """Bound after configure_logging (a module-level bound logger would freeze defaults)."""
    return get_logger("supervisor.worker")


class BootError(Exception):
    """The worker cannot start (bad handler, missing env); exit code 3."""


@dataclass(frozen=True)
class WorkerEnv:
    agent: str
    worker: str
    handler: str
    group: str
    consumer: str
    streams: list[str]
    redis_url: str
    concurrency: int
    count: int
    max_deliveries: int
    dlq_stream: str | None
    watchdog_seconds: float | None
    working_dir: str | None
    drain_timeout: float
    ordered: bool
    shards: int
    base_streams: list[str]
    namespace: str
    discovery_interval: float = 5.0
    handler_timeout: float = 0.0
    handler_timeout_grace: float = 10.0
    claim_idle: float = 0.0
    dead_letter_maxlen: int | None = None
    ownership_fence: float = 0.0
    shard_lease_ttl: float = 10.0
    member_lease_key: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerEnv:
        def need(name: str) -> str:
            value = environ.get(name)
            if not value:
                raise BootError(f"environment variable {name} is not set")
            return value

        def num(name: str, default: int) -> int:
            try:
                return int(environ.get(name) or default)
            except ValueError:
                raise BootError(f"{name} must be an integer") from None

        def seconds(name: str, default: float) -> float:
            try:
                value = float(environ.get(name) or default)
            except ValueError:
                raise BootError(f"{name} must be a number of seconds") from None
            if value < 0:
                raise BootError(f"{name} must be >= 0")
            return value

        watchdog_usec = num("AG1_WATCHDOG_USEC", 0)
        return cls(
            agent=need("AG1_AGENT"),
            worker=environ.get("AG1_WORKER", need("AG1_AGENT") + "/0"),
            handler=need("AG1_HANDLER"),
            group=need("AG1_GROUP"),
            consumer=need("AG1_CONSUMER"),
            streams=[s for s in need("AG1_STREAMS").split(",") if s],
            redis_url=need("REDIS_URL"),
            concurrency=num("AG1_CONCURRENCY", 16),
            count=num("AG1_COUNT", 100),
            max_deliveries=num("AG1_MAX_DELIVERIES", 5),
            dlq_stream=environ.get("AG1_DLQ") or None,
            watchdog_seconds=watchdog_usec / 1e6 if watchdog_usec > 0 else None,
            working_dir=environ.get("AG1_WORKING_DIR") or None,
            drain_timeout=float(environ.get("AG1_DRAIN_TIMEOUT") or 10.0),
            ordered=environ.get("AG1_ORDERED") == "1",
            shards=num("AG1_SHARDS", 0),
            base_streams=[s for s in environ.get("AG1_BASE_STREAMS", "").split(",") if s],
            namespace=environ.get("BUS_NAMESPACE") or DEFAULT_NAMESPACE,
            discovery_interval=seconds("AG1_DISCOVERY_INTERVAL", 5.0) or 5.0,
            handler_timeout=seconds("AG1_HANDLER_TIMEOUT", 0.0),
            handler_timeout_grace=seconds("AG1_HANDLER_TIMEOUT_GRACE", 10.0),
            claim_idle=seconds("AG1_CLAIM_IDLE", 0.0),
            dead_letter_maxlen=num("AG1_DLQ_MAXLEN", -1) if "AG1_DLQ_MAXLEN" in environ else None,
            ownership_fence=seconds("AG1_OWNERSHIP_FENCE", 0.0),
            shard_lease_ttl=seconds("AG1_SHARD_LEASE_TTL", 10.0) or 10.0,
            member_lease_key=environ.get("AG1_MEMBER_LEASE") or "",
        )


def load_handler(spec: str, working_dir: str | None) -> Callable[..., Any]:
    """Import ``pkg.mod:func`` with ``working_dir`` first on sys.path.

    :raises BootError: one clear line saying what is wrong.
    """
    if working_dir and working_dir not in sys.path:
        sys.path.insert(0, working_dir)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BootError(
            f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise BootError(f"handler {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise BootError(f"handler {spec!r} is not callable")
    if not (
        inspect.iscoroutinefunction(target)
        or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004
        )
    ):
        raise BootError(f"handler {spec!r} is not an async function")
    return target  # type: ignore[no-any-return]


def heartbeat_interval(watchdog_seconds: float | None) -> float:
    """Half the watchdog, at most 1 s (stats stay fresh even without a watchdog)."""
    if watchdog_seconds is None:
        return 1.0
    return max(0.01, min(watchdog_seconds / 2, 1.0))


async def _subscribe(redis: AsyncRedis, env: WorkerEnv, handler: Callable[..., Any]) -> Any:
    if env.ordered:
        from core_bus.ordered.subscription import subscribe_ordered

        return await subscribe_ordered(
            redis,
            env.base_streams,
            env.shards,
            handler,
            env.group,
            env.consumer,
            max_deliveries=env.max_deliveries,
            dlq_stream=env.dlq_stream,
            keys=StreamKeyBuilder(env.namespace, cluster=cluster_from_env()),
            lease_ttl=env.shard_lease_ttl,
        )
    if any(is_pattern(stream) for stream in env.streams):  # plain names and patterns
        from core_bus.following import follow_streams

        return await follow_streams(
            redis,
            env.streams,
            handler,
            env.group,
            consumer=env.consumer,
            poll_delay=env.discovery_interval,
            concurrency=env.concurrency,
            count=env.count,
            max_deliveries=env.max_deliveries,
            dlq_stream=env.dlq_stream,
            keys=StreamKeyBuilder(env.namespace, cluster=cluster_from_env()),
        )
    from core_bus.consume.subscription import subscribe

    return await subscribe(
        redis,
        env.streams,
        handler,
        env.group,
        env.consumer,
        concurrency=env.concurrency,
        count=env.count,
        max_deliveries=env.max_deliveries,
        dlq_stream=env.dlq_stream,
        keys=StreamKeyBuilder(env.namespace, cluster=cluster_from_env()),
        handler_timeout=env.handler_timeout,
        handler_timeout_grace=env.handler_timeout_grace,
        claim_idle=env.claim_idle,
        dead_letter_maxlen=env.dead_letter_maxlen,
        ownership_fence=env.ownership_fence,
        member_lease_key=env.member_lease_key,
    )


def _report_to(sub: Any, notifier: Notifier) -> None:
    """Tell the supervisor at once which suspect runs alone and how many handlers are stuck.

    A datagram is queued on the supervisor's socket before the handler starts,
    so even a crash a microsecond later is attributed to the message, not the
    process (see supervisor.runtime.exits).
    """
    if hasattr(sub, "on_isolation"):
        sub.on_isolation = lambda entry: notifier.send(f"X_AG1_ISOLATING={entry or ''}")
    if hasattr(sub, "on_stuck"):
        sub.on_stuck = lambda n: notifier.send(f"X_AG1_STUCK={n}")


def _stats_payload(sub: Any) -> str:
    stats = getattr(sub, "stats", None)
    data = stats.to_dict() if stats is not None else {}
    return json.dumps(data, separators=(",", ":"))


async def _started_or_stopped(sub: Any, signals: Any) -> bool:
    """Wait for the subscription to start; False when SIGTERM/SIGINT came first."""
    stopped = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal stopped
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stopped = True
                    tg.cancel_scope.cancel()
                    return
                # SIGUSR1/SIGUSR2 before ready: nothing is pending for us yet.

        tg.start_soon(watch)
        await sub.started()
        tg.cancel_scope.cancel()
    return not stopped


async def run_worker(env: WorkerEnv, handler: Callable[..., Any]) -> int:
    """Subscribe, report READY, heartbeat, drain on SIGTERM; returns the exit code."""
    from core_bus.settings import connect

    notifier = Notifier()
    redis = connect(env.redis_url)
    try:
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2
        ) as signals:
            sub = await _subscribe(redis, env, handler)
            if not await _started_or_stopped(sub, signals):
                # SIGTERM before we were ready (Redis unreachable, slow start): leave now.
                _log().info("worker stopped before ready", agent=env.agent, worker=env.worker)
                with anyio.CancelScope(shield=True), anyio.move_on_after(env.drain_timeout):
                    await sub.stop(env.drain_timeout)
                return 0
            _report_to(sub, notifier)
            # No "worker ready" line here: the supervisor logs it when READY arrives.
            notifier.send("READY=1", f"STATUS=consuming {','.join(env.streams)}")
            interval = heartbeat_interval(env.watchdog_seconds)
            drained = False
            async with anyio.create_task_group() as tg:

                async def heartbeat() -> None:
                    while True:
                        stats = getattr(sub, "stats", None)
                        in_flight = getattr(stats, "in_flight", 0)
                        processed = getattr(stats, "processed", 0)
                        notifier.send(
                            "WATCHDOG=1",
                            f"STATUS=processed {processed}, in flight {in_flight}",
                            f"X_AG1_STATS={_stats_payload(sub)}",
                        )
                        await anyio.sleep(interval)

                async def watch_subscription() -> None:
                    await sub.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(heartbeat)
                tg.start_soon(watch_subscription)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        if getattr(sub, "paused", False):
                            sub.resume()  # re-checks what it holds, then looks at pending
                        sub.check_pending()
                        continue
                    if signum == signal.SIGUSR2:
                        if hasattr(sub, "pause"):
                            sub.pause()  # our supervisor is cut off from the fleet
                        continue
                    _log().info("worker draining", agent=env.agent, worker=env.worker)
                    notifier.send("STOPPING=1")
                    with anyio.CancelScope(shield=True):
                        await sub.stop(env.drain_timeout)
                    drained = True
                    tg.cancel_scope.cancel()
                    break
            notifier.send(f"X_AG1_STATS={_stats_payload(sub)}")
            if not drained:  # the subscription ended on its own: an error
                _log().error("subscription ended", agent=env.agent, worker=env.worker)
                return 1
            return 0
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
        notifier.close()


def main(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    configure_logging()
    try:
        env = WorkerEnv.from_environ(environ)
        handler = load_handler(env.handler, env.working_dir)
    except BootError as exc:
        _log().error(
            "worker boot failed",
            agent=environ.get("AG1_AGENT"),
            worker=environ.get("AG1_WORKER"),
            error=str(exc),
        )
        return EXIT_BOOT_FAILURE
    try:
        return anyio.run(run_worker, env, handler)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        _log().error(
            "worker failed",
            agent=env.agent,
            worker=env.worker,
            error=f"{type(exc).__name__}: {exc}",
            exc_info=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
