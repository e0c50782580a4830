"""``ag1-bus``: tail, publish, groups and dead-letter tools for operators.

Every failure a user can cause or meet (Redis down, unknown stream, bad JSON,
missing file) is one line on stderr and a non-zero exit, never a traceback.
Exit codes: 0 ok (also Ctrl-C during ``tail``), 1 runtime error, 2 usage error,
130 interrupted.

One job in one file (over ~400 lines on purpose): the argument tree of every
``ag1-bus`` command with its one-line error handling; each command's body is
short and calls :mod:`core_bus.tools.tail` or :mod:`core_bus.tools.dlq`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

    from core_bus.envelope import Envelope

# Everything heavier (redis, anyio, pydantic, structlog) is imported once the arguments
# are parsed: `ag1-bus --help` and a usage error answer at once.

PROG = "ag1-bus"
LOAD_BATCH = 500
PROGRESS_SECONDS = 0.5


class UsageError(Exception):
    """Bad arguments or input (exit 2)."""


# -- argument parsing ---------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--redis-url",
        default=default,
        metavar="URL",
        help="Redis to use (default: $REDIS_URL / $REDIS_HOST..., else ./.ag1/redis.url of a "
        "fleet started here, else redis://127.0.0.1:6379/0, which dlq replay/purge and "
        "groups --destroy refuse)",
    )
    parser.add_argument(
        "--state-dir",
        default=default,
        metavar="DIR",
        help="read the Redis URL from DIR/redis.url (written by a running supervisor)",
    )
    parser.add_argument(
        "--redis-mode",
        default=default,
        choices=("standalone", "sentinel", "cluster"),
        help="how to reach Redis (default: $REDIS_MODE, else standalone); sentinel: the URL "
        "gives only credentials and db; cluster: the URL is any seed node",
    )
    parser.add_argument(
        "--sentinel",
        action="append",
        default=default,
        metavar="HOST:PORT",
        help="a sentinel to ask for the master (repeatable; default: $REDIS_SENTINELS); "
        "its password only from $REDIS_SENTINEL_PASSWORD",
    )
    parser.add_argument(
        "--master-name",
        default=default,
        metavar="NAME",
        help="the master's name at the sentinels (default: $REDIS_MASTER_NAME)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="do not say which Redis is used, nor warn about streams nobody reads",
    )


def _sub(subparsers: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, suppress=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for the AG1 bus: watch streams, publish, inspect groups and "
        "dead letters. Each command says on stderr which Redis it uses (-q to silence).",
        epilog="examples:\n  ag1-bus tail 'AG1:agent:*:inbox'\n"
        "  ag1-bus publish AG1:agent:echo:inbox --content '{\"hello\": \"world\"}'\n"
        "  ag1-bus dlq list echo\n  ag1-bus groups            # every group, orphans marked\n"
        "\nrun 'ag1-bus COMMAND --help' for each command",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tail = _sub(
        commands,
        "tail",
        "show a stream's backlog, then live entries (XREAD only: no group, no ack)",
        "ag1-bus tail AG1:agent:echo:inbox --last 20   # or a pattern: 'AG1:agent:*:inbox'",
    )
    tail.add_argument(
        "streams", nargs="+", metavar="STREAM", help="stream name or glob pattern (several ok)"
    )
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--from-start", action="store_true", help="show the whole backlog")
    start.add_argument(
        "--last", type=int, default=10, metavar="N", help="show the last N backlog entries (10)"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per entry")
    tail.add_argument(
        "--full", action="store_true", help="show each entry's content whole, not cut short"
    )
    tail.add_argument("--count", type=int, metavar="N", help="exit after N entries")

    pub = _sub(
        commands,
        "publish",
        "publish envelopes (with --count: a load generator reporting the rate achieved)",
        'ag1-bus publish AG1:agent:echo:inbox --content \'{"text": "hi"}\' '
        "--reply-to AG1:user:me:inbox",
    )
    pub.add_argument("stream", metavar="STREAM", help="the stream to XADD to")
    pub.add_argument("--role", default="user", help="envelope role (user)")
    content = pub.add_mutually_exclusive_group()
    content.add_argument(
        "--content", metavar="JSON|@FILE", help="content as JSON, @file, or @- for stdin"
    )
    content.add_argument("--text", metavar="STR", help="content as a plain string")
    pub.add_argument(
        "--reply-to", metavar="STREAM", help="stream the receiver should answer on (reply_to)"
    )
    pub.add_argument("--agent-name", metavar="NAME", help="sender name put in the envelope")
    pub.add_argument(
        "--correlation-id", metavar="ID", help="correlation id (default: a new one)"
    )
    pub.add_argument(
        "--count", type=int, metavar="N", help="publish N envelopes and report the rate"
    )

    groups = _sub(
        commands,
        "groups",
        "consumer groups of a stream (consumers, pending, lag, idle), or without STREAM "
        "every group of the namespace with orphans (groups no fleet reads) marked",
        "ag1-bus groups AG1:agent:echo:inbox --json\n"
        "  ag1-bus groups AG1:agent:old:inbox --destroy old   # remove an orphan group",
    )
    groups.add_argument(
        "stream", metavar="STREAM", nargs="?", help="the stream (default: every stream)"
    )
    groups.add_argument("--json", action="store_true", help="print JSON")
    groups.add_argument(
        "--destroy",
        metavar="GROUP",
        help="remove GROUP from STREAM (XGROUP DESTROY): refused when a fleet records the "
        "group or it has pending entries, unless --force",
    )
    groups.add_argument(
        "--force", action="store_true", help="with --destroy: remove it even so"
    )

    dlq = _sub(
        commands,
        "dlq",
        "list, replay or purge dead letters",
        "ag1-bus dlq list echo   # TARGET: a dead-letter stream, a group/agent, or a stream",
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    target_help = "dead-letter stream (AG1:dlq:G), group or agent name, or source stream"
    dlq_list = _sub(
        dlq_commands, "list", "list dead letters", "ag1-bus dlq list AG1:agent:echo:inbox"
    )
    dlq_list.add_argument("target", metavar="TARGET", help=target_help)
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per letter")
    dlq_list.add_argument("--limit", type=int, default=100, metavar="N", help="show N (100)")
    replay = _sub(
        dlq_commands,
        "replay",
        "re-add dead letters to their source streams, then remove them from the DLQ "
        "(refuses the implicit default Redis)",
        "ag1-bus dlq replay echo --id 1732540000000-0",
    )
    replay.add_argument("target", metavar="TARGET", help=target_help)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="ID",
        help="a dead letter's id (from dlq list); repeat for several",
    )
    which.add_argument("--all", action="store_true", help="every dead letter of TARGET")
    purge = _sub(
        dlq_commands,
        "purge",
        "delete dead letters (asks first unless --yes; refuses the implicit default Redis)",
        "ag1-bus dlq purge echo --yes",
    )
    purge.add_argument("target", metavar="TARGET", help=target_help)
    purge.add_argument(
        "--id",
        action="append",
        dest="ids",
        metavar="ID",
        help="only this dead letter (repeat for several; default: all of TARGET)",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask")
    return parser


# -- commands ---------------------------------------------------------------------


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def cmd_tail(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.tools.tail import Tailer, TailOptions

    if args.last is not None and args.last < 0:
        raise UsageError("--last must be >= 0")
    options = TailOptions(
        names=args.streams,
        last=None if args.from_start else args.last,
        count=args.count,
        as_json=args.json,
        full=args.full,
    )
    tailer = Tailer(
        redis, options, _out, flush=sys.stdout.flush, notify=lambda m: _err(f"{PROG}: {m}")
    )
    missing = await tailer.start()
    for name in missing:
        _err(f"{PROG}: {name} does not exist yet; waiting for it")
    sys.stdout.flush()
    await tailer.follow()
    return 0


def _read_content(args: argparse.Namespace) -> Any:
    if args.text is not None:
        return args.text
    if args.content is None:
        return None
    raw = args.content
    source = "--content"
    if raw.startswith("@"):
        source = raw[1:] or "-"
        try:
            raw = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc}); use --text for a plain string"
        ) from exc


def _envelope(args: argparse.Namespace, content: Any) -> Envelope:
    from core_bus.envelope import Envelope

    return Envelope(
        role=args.role,
        content=content,
        reply_to=args.reply_to,
        agent_name=args.agent_name,
        correlation_id=args.correlation_id,
    )


async def cmd_publish(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.publish import publish_envelope, publish_many
    from core_bus.tools.groups import publish_warnings

    content = _read_content(args)
    if not args.quiet:
        for warning in await publish_warnings(redis, args.stream):
            _err(f"{PROG}: warning: {warning} (-q to silence)")
    if args.count is None:
        _out(await publish_envelope(redis, args.stream, _envelope(args, content)))
        return 0
    if args.count < 1:
        raise UsageError("--count must be >= 1")
    started = last_report = time.monotonic()
    done = 0
    while done < args.count:
        size = min(LOAD_BATCH, args.count - done)
        await publish_many(redis, args.stream, [_envelope(args, content) for _ in range(size)])
        done += size
        now = time.monotonic()
        if now - last_report >= PROGRESS_SECONDS:
            last_report = now
            _err(f"published {done}/{args.count} ({done / (now - started):,.0f} msgs/s)")
    elapsed = max(time.monotonic() - started, 1e-9)
    _out(
        f"published {done} envelopes to {args.stream} in {elapsed:.2f}s "
        f"({done / elapsed:,.0f} msgs/s)"
    )
    return 0


async def cmd_groups(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.streams.groups import format_groups_table, group_infos
    from core_bus.tools.connection import require_explicit
    from core_bus.tools.groups import destroy_group, namespace_table

    if args.destroy is not None:
        if args.stream is None:
            raise UsageError("--destroy GROUP needs the STREAM it is on")
        require_explicit(args.redis_choice, f"destroy group {args.destroy}")
        _out(await destroy_group(redis, args.stream, args.destroy, force=args.force))
        return 0
    if args.stream is None:
        _out(await namespace_table(redis, as_json=args.json))
        return 0
    infos = await group_infos(redis, args.stream)
    if args.json:
        _out(json.dumps({"stream": args.stream, "groups": [g.to_dict() for g in infos]}))
    else:
        _out(format_groups_table(args.stream, infos))
    return 0


def _letter_json(dlq: str, letter: Any) -> dict[str, Any]:
    data = letter.data.decode("utf-8", "replace") if letter.data else ""
    return {
        "dlq": dlq,
        "id": letter.id,
        "reason": letter.reason,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "source_stream": letter.source_stream,
        "source_id": letter.source_id,
        "group": letter.group,
        "consumer": letter.consumer,
        "dead_lettered_at": letter.dead_lettered_at,
        "data": data,
    }


async def cmd_dlq_list(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.tools.dlq import list_dead_letters, resolve_target

    target = await resolve_target(redis, args.target)
    letters = await list_dead_letters(redis, target)
    shown = letters[: max(args.limit, 0)]
    if args.json:
        for dlq, letter in shown:
            _out(json.dumps(_letter_json(dlq, letter), ensure_ascii=False))
        return 0
    if not letters:
        _out(f"no dead letters for {args.target}")
        return 0
    for dlq, letter in shown:
        error = letter.error.splitlines()[0][:80] if letter.error else ""
        _out(
            f"{letter.id}  {letter.dead_lettered_at[:19]}  {letter.reason:<16} "
            f"deliveries={letter.deliveries}  {letter.source_stream} {letter.source_id}"
            f"  [{dlq}]  {error}"
        )
    if len(letters) > len(shown):
        _out(f"... {len(letters) - len(shown)} more (use --limit)")
    return 0


async def cmd_dlq_replay(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.tools.connection import require_explicit
    from core_bus.tools.dlq import replay_dead_letters, resolve_target

    require_explicit(args.redis_choice, "replay dead letters")
    target = await resolve_target(redis, args.target)
    result = await replay_dead_letters(redis, target, None if args.all else args.ids)
    for dlq, entry_id, new_id in result.replayed:
        _out(f"replayed {entry_id} from {dlq} as {new_id}")
    for _dlq, entry_id, why in result.skipped:
        _err(f"{PROG}: skipped {entry_id}: {why}")
    _out(f"{len(result.replayed)} replayed, {len(result.skipped)} skipped")
    return 1 if result.skipped and not result.replayed else 0


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("refusing to purge: stdin is not a terminal to confirm on; pass --yes")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


async def cmd_dlq_purge(redis: AsyncRedis, args: argparse.Namespace) -> int:
    from core_bus.tools.connection import require_explicit
    from core_bus.tools.dlq import list_dead_letters, purge_dead_letters, resolve_target

    require_explicit(args.redis_choice, "purge dead letters")
    target = await resolve_target(redis, args.target)
    letters = await list_dead_letters(redis, target)
    ids = [letter.id for _dlq, letter in letters]
    if args.ids is not None:
        ids = [i for i in ids if i in set(args.ids)]
    if not ids:
        _out(f"no dead letters to purge for {args.target}")
        return 0
    if not args.yes and not _confirm(f"delete {len(ids)} dead letter(s) of {args.target}?"):
        _err(f"{PROG}: purge cancelled")
        return 1
    deleted = await purge_dead_letters(redis, target, ids)
    _out(f"purged {deleted} dead letter(s)")
    return 0


Command = Callable[[Any, argparse.Namespace], Awaitable[int]]

COMMANDS: dict[str, Command] = {
    "tail": cmd_tail,
    "publish": cmd_publish,
    "groups": cmd_groups,
    "dlq list": cmd_dlq_list,
    "dlq replay": cmd_dlq_replay,
    "dlq purge": cmd_dlq_purge,
}


# -- running ----------------------------------------------------------------------


async def _run(command: Command, args: argparse.Namespace, url: str) -> int:
    """Run ``command``; SIGINT/SIGTERM cancel it (exit 0 for tail, 130 otherwise)."""
    import anyio

    from core_bus.settings import connect

    redis = connect(url, **args.redis_mode_options)
    interrupted = False
    result = 0
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _signum in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            async def body() -> None:
                # errors are re-raised below, bare (a task group would wrap them in a group)
                nonlocal result, error
                try:
                    result = await command(redis, args)
                except Exception as exc:
                    error = exc
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(watch_signals)
            tg.start_soon(body)
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    if interrupted:
        return 0 if args.command == "tail" else 130
    if error is not None:
        raise error
    return result


def _command_key(args: argparse.Namespace) -> str:
    if args.command == "dlq":
        return f"dlq {args.dlq_command}"
    return str(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ag1-bus`` console script."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    import anyio
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from core_bus.connection import ConnectionConfigError
    from core_bus.errors import BusError
    from core_bus.log import configure_logging
    from core_bus.settings import redact_url
    from core_bus.tools.connection import RedisChoiceError, resolve_mode, resolve_redis

    configure_logging(level=os.environ.get("AG1_LOG_LEVEL") or "WARNING")
    url = ""
    where = ""
    try:
        choice = resolve_redis(args.redis_url, args.state_dir)
        url = choice.url
        args.redis_choice = choice
        mode = resolve_mode(args.redis_mode, args.sentinel, args.master_name)
        args.redis_mode_options = mode.options()
        where = mode.describe()
        if not args.quiet:
            _err(f"{PROG}: {choice.describe()}{where}")
        return anyio.run(_run, COMMANDS[_command_key(args)], args, url)
    except (UsageError, RedisChoiceError, ConnectionConfigError) as exc:
        _err(f"{PROG}: {exc}")
        return 2
    except (RedisConnectionError, RedisTimeoutError) as exc:
        _err(f"{PROG}: cannot reach Redis at {redact_url(url)}{where}: {exc}")
        return 1
    except (BusError, RedisError) as exc:
        _err(f"{PROG}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0 if args.command == "tail" else 130
    except BrokenPipeError:
        detach_stdout()
        return 0


def detach_stdout() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so the
    interpreter's final flush does not print a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
