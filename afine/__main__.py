"""`python -m afine <command>`: the package's command line (currently: score)."""

from __future__ import annotations

import argparse
import sys

from . import score
from .errors import AfineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afine", description="A-FINE image quality (lower is better).")
    commands = parser.add_subparsers(dest="command", required=True)
    score.add_arguments(commands.add_parser("score", help="score (dis, ref) image pairs"))
    args = parser.parse_args(argv)
    try:
        return score.run(args)
    except AfineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
