"""``ag1-fleet`` command line: dispatches to one module per command group."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ag1-fleet`` console script."""
    from supervisor.cli.commands import main as commands_main

    try:
        return commands_main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # `ag1-fleet check | head`: the reader left; exit quietly like other Unix tools.
        from core_bus.tools.cli import detach_stdout

        detach_stdout()
        return 141


if __name__ == "__main__":
    sys.exit(main())
