"""`python -m afine <command>`: the package's command line (currently: score)."""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from .interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import sys

from . import score
from .errors import ArgumentParser, command


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m afine", description="A-FINE image quality (lower is better).")
    commands = parser.add_subparsers(dest="command", required=True)
    score.add_arguments(commands.add_parser("score", help="score (dis, ref) image pairs"))
    return score.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
