"""`afine <command>` (installed by pip) or `python -m afine <command>`: the command line (score, compare,
curves, export-onnx)."""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from .interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import argparse
import sys

from .errors import ArgumentParser, command
from .interrupts import exit_on_ctrl_c


class Version(argparse.Action):
    """`afine --version`: the version, the weights a command would use and their SHA-256, torch and the device."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version, the weights a command would use "
                         "(with their SHA-256), torch's version and the device, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .provenance import version_text

        print(version_text())
        parser.exit()


@command
def main(argv: list[str] | None = None) -> int:
    from . import compare, onnx_export, score  # here, not above: `afine` handles Ctrl-C before torch loads (entry)

    prog = "python -m afine" if sys.argv[0].endswith("__main__.py") else "afine"
    parser = ArgumentParser(prog=prog, description="A-FINE image quality (lower is better).")
    parser.add_argument("--version", action=Version)
    commands = parser.add_subparsers(dest="command", required=True)
    score.add_arguments(commands.add_parser("score", help="score (dis, ref) image pairs"))
    compare.add_arguments(commands.add_parser("compare", help="compare methods' result folders against references: "
                                              "tables, statistics and a visual report",
                                              description=compare.DESCRIPTION))
    curves = commands.add_parser("curves", help="training curves of run folders as one picture (needs matplotlib)")
    curves.add_argument("runs", nargs="+", metavar="RUN", help="training run folders (out_dir) or their log.jsonl")
    curves.add_argument("--out", default="curves.png", help="the picture to write, in the format its suffix names: "
                        ".png (default curves.png), .pdf, .svg, .jpg, .tif, .eps, .ps; '-': PNG on standard output")
    onnx_export.add_arguments(commands.add_parser("export-onnx", help="the scoring model as an ONNX file (needs "
                                                  "onnx, onnxscript and onnxruntime: pip install '.[onnx]')"))
    args = parser.parse_args(argv)
    if args.command == "curves":
        from . import plots  # imported only by this command: scoring does not pay for the plotting code

        return plots.curves_command(args)
    if args.command == "compare":
        return compare.run(args)
    if args.command == "export-onnx":
        return onnx_export.run(args)  # onnx, onnxscript and onnxruntime are imported there, by this command only
    return score.run(args)


def entry() -> int:
    """The `afine` command that `pip install` makes: Ctrl-C is one line and exit code 130 from the first moment,
    as for `python -m afine` (afine/interrupts.py)."""
    exit_on_ctrl_c()
    return main()


if __name__ == "__main__":
    sys.exit(main())
