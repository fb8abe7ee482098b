"""2AFC accuracy of an A-FINE model on the published benchmarks (docs/evaluation.md), in one run.

    python evaluate.py --bench all              # data/, data/afine.pth (and data/ViT-B-32.pt if it holds no CLIP)
    python evaluate.py --bench all --data-root ROOT --clip ViT-B-32.pt --weights afine.pth
    python evaluate.py --bench kadid10k,sriqa-all --data-root ROOT --weights runs/s1 --stage 1 --json s1.json
    torchrun --nproc_per_node 4 evaluate.py --bench all --data-root ROOT --weights afine.pth

--precision bf16 (or fp16) runs CLIP under autocast, the heads in float32: faster where the hardware has it,
with scores off by a little (docs/scoring.md, "Precision"); the default fp32 is exact.
--compile compiles CLIP with torch.compile, once per image size and batch (docs/scoring.md, "Compiled kernels").
--weights is a merged afine.pth or a run folder (a stage-2/3 run folder chains to its earlier stages through
its config.json); --clip is needed only when the weights hold no fine-tuned CLIP. The score is the raw
naturalness N for --stage 1, the raw fidelity F for --stage 2, and D for --stage 3 (default, released models).
Lower is better. Benchmarks: sriqa-all, sriqa-reg, sriqa-gen, diffiqa-psy, diffiqa-pny, diffiqa-sny,
diffiqa-pyy, diffiqa-nyy, kadid10k, tid2013, pipal (see afine/benchmarks.py for the files each reads). Any other
name is a dataset folder under --data-root laid out like KADID10K (images/, Test/Triplet/Triplet.txt, Test/MOS/),
evaluated like kadid10k.
With --bench all, a benchmark whose folder is missing (the dataset folder, or its Test/ or SRIQA MOS folder) is
listed as skipped; naming a missing benchmark is an error.

Output: one table row per benchmark on stdout: pairs, correct, 2AFC accuracy (delta = 0: a tie counts only for
g = 0.5), seconds (wall time of the row; the images of one dataset are scored once, with its first benchmark,
and reused by the others), and for the MOS-labelled sets (sriqa-*, kadid10k, tid2013, pipal) SRCC, PLCC (after
a 4-parameter logistic fit) and KRCC between -score and MOS (sign flipped because scores are lower-is-better,
so agreement is positive; SRIQA scenes pooled). The stage-1 score of an image ignores its reference.
--json FILE writes {benchmark: {"accuracy", "pairs", "correct", "seconds"[, "srcc", "plcc", "krcc", "mos_images"]}}
for the evaluated benchmarks (skipped ones are left out).
--plots DIR writes DIR/<benchmark>.png (needs matplotlib): for MOS-labelled sets the score against MOS with the
fitted logistic, SRCC and PLCC; the 2AFC accuracy per SR method (SRIQA) or per distortion type where the file
names carry it (docs/evaluation.md, "Evaluation plots").
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from afine.interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import argparse
import math
import sys
import time

from afine.atomic import JSON, check_writable, printout, write_json
from afine.benchmarks import Indexes, dataset_of, load_benchmark, missing_folder, parse_benchmarks
from afine.compiled import compile_model
from afine.errors import AfineError, ArgumentParser, command, printable
from afine.evaluation import (
    DEFAULT_CLIP,
    STAGE_PARTS,
    TermCache,
    add_model_arguments,
    check_model_arguments,
    close_distributed,
    compute_terms,
    item_scores,
    model_files,
    pick_device,
    world,
)
from afine.metrics import correlations, two_afc_accuracy
from afine.model import PRECISIONS, load_afine

SCORE_NAMES = {1: "raw naturalness N", 2: "raw fidelity F", 3: "A-FINE D"}


def evaluate(model, benches, stage: int, cache: TermCache, kept: dict | None = None, **run) -> dict[str, dict]:
    """Accuracy (and MOS correlations) of every loaded benchmark, sharing `cache` across them. `kept`, when
    given, receives each benchmark's {(image, reference): score} (for the plots)."""
    results = {}
    done: set[str] = set()
    for bench in benches:
        start = time.perf_counter()
        dataset = dataset_of(bench.name)
        if dataset not in done:  # the dataset's benchmarks share images: score the union once, with the first
            done.add(dataset)
            shared = [it for b in benches if dataset_of(b.name) == dataset for it in b.items()]
            compute_terms(model, list(dict.fromkeys(shared)), stage, cache, desc=dataset, **run)
        items = bench.items()
        scores = dict(zip(items, item_scores(model, cache, items, stage)))
        if kept is not None:
            kept[bench.name] = scores
        u1 = [scores[it] for it in zip(bench.x1, bench.y)]
        u2 = [scores[it] for it in zip(bench.x2, bench.y)]
        accuracy, correct, pairs = two_afc_accuracy(u1, u2, bench.g)
        result = {"accuracy": accuracy, "pairs": pairs, "correct": correct}
        if bench.mos is not None:
            result.update(correlations([scores[it] for it in zip(bench.mos_images, bench.mos_refs)], bench.mos))
            result["mos_images"] = len(bench.mos)
        result["seconds"] = time.perf_counter() - start
        results[bench.name] = result
    return results


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(names: list[str], results: dict[str, dict], skipped: dict[str, str]) -> str:
    head = f"{'benchmark':<12} {'pairs':>7} {'correct':>7} {'accuracy':>8} {'seconds':>8} {'srcc':>7} {'plcc':>7} " \
           f"{'krcc':>7}"
    lines = [head]
    for name in names:
        shown = printable(name)  # a dataset folder's name need not be UTF-8
        if name in skipped:
            lines.append(f"{shown:<12} skipped ({printable(skipped[name])})")
            continue
        r = results[name]
        lines.append(f"{shown:<12} {r['pairs']:>7} {r['correct']:>7} {fmt(r['accuracy'], '.4f'):>8} "
                     f"{r['seconds']:>8.2f} {fmt(r.get('srcc'), '.4f'):>7} {fmt(r.get('plcc'), '.4f'):>7} "
                     f"{fmt(r.get('krcc'), '.4f'):>7}")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="all",
                        help="'all' or a comma list of benchmark names or dataset folder names (default all)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3,
                        help="score: 1 raw naturalness, 2 raw fidelity, 3 D (default)")
    parser.add_argument("--json", help="write results to this JSON file (*.json; '-': standard output, the "
                        "table then going to stderr)")
    parser.add_argument("--plots", metavar="DIR", help="write a PNG per benchmark into this folder (needs matplotlib)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="CLIP's precision: fp32 (default, exact), bf16 or fp16 autocast (heads in float32)")
    parser.add_argument("--compile", action="store_true",
                        help="compile CLIP with torch.compile, once per image size and batch (docs/scoring.md, "
                             "\"Compiled kernels\")")
    add_model_arguments(parser)
    try:
        args = parser.parse_args(argv)
        check_model_arguments(args)
        names = parse_benchmarks(args.bench, args.data_root)
        if args.plots:
            from afine import plots  # imported only when asked for: evaluation alone does not pay for it

            plots.require_matplotlib("evaluate.py --plots")
        all_named = "all" in [n.strip().lower() for n in args.bench.split(",")]
        skipped = {n: f"no folder {missing_folder(args.data_root, n)}" for n in names
                   if all_named and missing_folder(args.data_root, n) is not None}
        indexes = Indexes()
        benches = [load_benchmark(args.data_root, n, indexes) for n in names if n not in skipped]
        if not benches:
            raise AfineError(f"{args.data_root}: none of the benchmark dataset folders is present")
        # outputs are checked before the work, not after it, and never go over a file the command reads
        inputs = [*{p for b in benches for item in b.items() for p in item},
                  *(f for b in benches for f in b.label_files), *model_files(args)]
        if args.json:
            check_writable(args.json, inputs, JSON)
        if args.plots:
            plots.check_plots(args.plots, [b.name for b in benches], inputs)
        device = pick_device(args.device)
        model = load_afine(args.weights, clip=args.clip, require=STAGE_PARTS[args.stage], default_clip=DEFAULT_CLIP)
        model = model.to(device)
        if args.compile:
            compile_model(model)
        cache, kept = TermCache(), {}
        start = time.perf_counter()
        results = evaluate(model, benches, args.stage, cache, kept, batch_size=args.batch_size, device=device,
                           workers=args.workers, progress=not args.no_progress,
                           precision=args.precision)
        rank, _ = world()
        if rank == 0:
            # results on stdout first, whatever happens to the file (on stderr when the file is stdout: --json -)
            print(table(names, results, skipped), file=printout(args.json))
            if args.json:
                write_json(args.json, results)
            if args.plots:
                plots.benchmark_plots(benches, kept, results, SCORE_NAMES[args.stage], args.plots)
                print(f"plots: {len(benches)} PNG files in {args.plots}", file=sys.stderr)
            distinct = len({p for b in benches for it in b.items() for p in (it if args.stage != 1 else it[:1])})
            print(f"stage {args.stage}: {distinct} distinct images, {cache.encoded} CLIP passes, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
