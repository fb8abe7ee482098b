"""`afine <command>` (installed by pip) or `python -m afine <command>`: the command line (currently: score)."""

from __future__ import annotations

import sys

from . import score
from .errors import ArgumentParser, command


@command
def main(argv: list[str] | None = None) -> int:
    prog = "python -m afine" if sys.argv[0].endswith("__main__.py") else "afine"
    parser = ArgumentParser(prog=prog, description="A-FINE image quality (lower is better).")
    commands = parser.add_subparsers(dest="command", required=True)
    score.add_arguments(commands.add_parser("score", help="score (dis, ref) image pairs"))
    return score.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
