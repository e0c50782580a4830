"""``ag1-fleet`` command line: dispatches to one module per command group."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ag1-fleet`` console script."""
    from supervisor.commands import main as commands_main

    return commands_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
