"""structlog setup: JSON lines in production, readable key=value on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(json: bool | None = None, level: str | None = None) -> None:
    """Configure structlog once per process.

    ``json=None`` picks JSON unless stderr is a terminal; ``AG1_LOG_FORMAT``
    (``json``/``console``) and ``AG1_LOG_LEVEL`` override.
    """
    global _configured
    fmt = os.environ.get("AG1_LOG_FORMAT", "").lower()
    if fmt in {"json", "console"}:
        json = fmt == "json"
    if json is None:
        json = not sys.stderr.isatty()
    level_name = (level or os.environ.get("AG1_LOG_LEVEL") or "INFO").upper()
    level_no = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str, **fields: Any) -> Any:
    """A lazy structlog logger with ``logger=name`` and extra fields.

    Lazy, so a module-level logger follows a later :func:`configure_logging`.
    """
    return structlog.get_logger(**{"logger_name": name, **fields})
