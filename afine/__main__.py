"""`python -m afine <command>`: the package's command line (score, curves)."""

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
    curves = commands.add_parser("curves", help="training curves of run folders as one PNG (needs matplotlib)")
    curves.add_argument("runs", nargs="+", metavar="RUN", help="training run folders (out_dir) or their log.jsonl")
    curves.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    args = parser.parse_args(argv)
    if args.command == "curves":
        from . import plots  # imported only by this command: scoring does not pay for the plotting code

        return plots.curves_command(args)
    return score.run(args)


if __name__ == "__main__":
    sys.exit(main())
