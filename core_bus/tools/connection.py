"""Which Redis ``ag1-bus`` talks to, and where that choice came from.

A newcomer whose fleet is stopped (or who is in another directory) must not
publish into, replay into or purge an unrelated Redis without noticing: every
command says on stderr which Redis it uses and why, and destructive commands
refuse the implicit default (see :func:`require_explicit`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core_bus.connection import ConnectionConfigError, format_sentinels, parse_sentinels
from core_bus.settings import get_settings, redact_url

STATE_URL_FILE = "redis.url"
DEFAULT_STATE_DIR = ".ag1"

ORIGIN_FLAG = "--redis-url"
ORIGIN_STATE_DIR = "--state-dir"
ORIGIN_ENV = "environment"
ORIGIN_LOCAL_STATE = "state dir"
ORIGIN_DEFAULT = "default"


class RedisChoiceError(Exception):
    """The Redis cannot be determined, or may not be used for this command (exit 2)."""


@dataclass(frozen=True)
class RedisChoice:
    """The URL (may hold a password: never print it unredacted) and its origin."""

    url: str
    origin: str
    detail: str

    @property
    def implicit(self) -> bool:
        """Nobody named this Redis: it is the built-in fallback."""
        return self.origin == ORIGIN_DEFAULT

    def describe(self) -> str:
        """``Redis redis://127.0.0.1:6390/0 (from ./.ag1/redis.url ...)``, password redacted."""
        return f"Redis {redact_url(self.url)} ({self.detail})"


def _read_state_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise RedisChoiceError(
            f"cannot read {path}: {exc.strerror or exc} "
            "(is the supervisor running with an embedded Redis?)"
        ) from exc


def resolve_redis(redis_url: str | None, state_dir: str | None) -> RedisChoice:
    """``--redis-url``, else ``--state-dir``/redis.url, else the environment (``REDIS_URL``
    or ``REDIS_HOST``...), else ``./.ag1/redis.url`` when present, else local Redis."""
    if redis_url:
        return RedisChoice(redis_url, ORIGIN_FLAG, "from --redis-url")
    if state_dir:
        path = Path(state_dir) / STATE_URL_FILE
        url = _read_state_file(path)
        if not url:
            raise RedisChoiceError(f"{path} is empty (is the supervisor still starting?)")
        return RedisChoice(url, ORIGIN_STATE_DIR, f"from {path}")
    env_names = [n for n in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT") if os.environ.get(n)]
    if env_names:
        return RedisChoice(get_settings().url(), ORIGIN_ENV, f"from ${'/$'.join(env_names)}")
    local = Path(DEFAULT_STATE_DIR) / STATE_URL_FILE
    if local.is_file():
        url = _read_state_file(local)
        if url:
            return RedisChoice(
                url, ORIGIN_LOCAL_STATE, f"from ./{local}, the fleet started in this directory"
            )
    return RedisChoice(
        get_settings().url(),
        ORIGIN_DEFAULT,
        f"default: no --redis-url, no $REDIS_URL, no ./{local}",
    )


def require_explicit(choice: RedisChoice, action: str) -> None:
    """Destructive commands never act on a Redis nobody named.

    :raises RedisChoiceError: ``choice`` is the implicit default.
    """
    if choice.implicit:
        raise RedisChoiceError(
            f"refusing to {action} in {redact_url(choice.url)}: no Redis was named "
            f"(no --redis-url, $REDIS_URL or ./{DEFAULT_STATE_DIR}/{STATE_URL_FILE}); "
            "pass --redis-url URL (or --state-dir DIR) or set REDIS_URL"
        )


@dataclass(frozen=True)
class ModeChoice:
    """The connection mode of ``ag1-bus`` (flags first, then ``REDIS_MODE`` & co)."""

    mode: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`core_bus.settings.connect` (the sentinel
        password is left to ``REDIS_SENTINEL_PASSWORD``: never a flag)."""
        return {
            "mode": self.mode,
            "sentinels": list(self.sentinels),
            "master_name": self.master_name,
        }

    def describe(self) -> str:
        """Appended to :meth:`RedisChoice.describe`: nothing in standalone mode."""
        if self.mode == "sentinel":
            return f" in sentinel mode: master {self.master_name!r} via " + format_sentinels(
                self.sentinels
            )
        if self.mode == "cluster":
            return " in cluster mode (the URL is a seed node)"
        return ""


def resolve_mode(
    mode: str | None, sentinels: list[str] | None, master_name: str | None
) -> ModeChoice:
    """``--redis-mode``/``--sentinel``/``--master-name``, else the environment.

    :raises ConnectionConfigError: sentinel mode without sentinels or master
        name, or a malformed ``host:port``.
    """
    settings = get_settings()
    chosen = mode or settings.redis_mode
    addresses = parse_sentinels(sentinels if sentinels else settings.redis_sentinels)
    name = master_name or settings.redis_master_name
    if chosen == "sentinel" and not addresses:
        raise ConnectionConfigError(
            "sentinel mode needs --sentinel HOST:PORT (or $REDIS_SENTINELS)"
        )
    if chosen == "sentinel" and not name:
        raise ConnectionConfigError("sentinel mode needs --master-name (or $REDIS_MASTER_NAME)")
    return ModeChoice(chosen, tuple(addresses), name)
