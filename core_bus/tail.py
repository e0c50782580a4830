"""``python -m core_bus.tail STREAM...``: watch streams without disturbing them.

The public import path of the tail tool (the prototype had ``core_bus.tail``);
the implementation is :mod:`core_bus.tools.tail`, the command line
:mod:`core_bus.tools.cli` (``ag1-bus tail``).
"""

from __future__ import annotations

import sys

from core_bus.tools.cli import main as cli_main
from core_bus.tools.tail import (
    Tailer,
    TailError,
    TailOptions,
    entry_json,
    entry_time,
    format_entry,
    parse_entry,
)

__all__ = [
    "TailError",
    "TailOptions",
    "Tailer",
    "entry_json",
    "entry_time",
    "format_entry",
    "main",
    "parse_entry",
]


def main(argv: list[str] | None = None) -> int:
    """The ``ag1-bus tail`` command with ``argv`` (default: this process's arguments)."""
    return cli_main(["tail", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
