"""fit_gamma: the stage-3 starting NR mapping, and the final 0..100 scale (docs/training.md, "Fit the NR mapping").

    python fit_gamma.py nr --data-root ROOT --weights runs/s1 [--clip ViT-B-32.pt] --out gamma.json
    python fit_gamma.py scale --data-root ROOT --weights runs/s3 [--clip ViT-B-32.pt] --out scale.json

nr: every distorted image of PIPAL/Train/MOS/*.txt is scored with the stage-1 model, x = N_raw(image); the MOS
is normalised to [-2, 2] with the sign flipped (best -> -2), y = -((m - min) / (max - min) * 4 - 2), and
y ~ 4 / (1 + exp(-(x - g3) / |g4|)) - 2 is fitted by least squares (scipy curve_fit, start
[mean(x), std(x) / 4]). Writes {"yita3": g3, "yita4": g4, ...}: the stage-3 NR mapping's starting values
(train_stage3.py --nr_init_file=gamma.json, or the config key nr_init_file). Published: 4.9592, 21.5968.

scale: every image of SRIQA-Bench/MOS/*.txt is scored with the stage-3 model, x = D(image, <scene>_Original.png);
MOS normalised to y = 100 - 100 * (m - min) / (max - min) over all scenes pooled, and
y ~ 100 / (1 + exp(-(x - center) / |width|)) fitted the same way. Writes {"center": c, "width": w, ...}, the
final scale D_scaled = 100 / (1 + exp(-(D - center) / width)). Published: -1.9710, 2.3734 (reported by the
official fit as -2.3734; only |width| matters).

Both write |g4| (the mappings use |g4|, so its sign carries no information), plus "images" (how many were
fitted), "rmse" (fit residual in y units) and "weights". The parameters are also printed on stdout.
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from afine.interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy.special import expit

from afine.atomic import JSON, check_writable, printout, write_json
from afine.benchmarks import Indexes, sriqa_scene
from afine.datasets import ImageIndex, dataset_dir, images_dir, sriqa_mos_files
from afine.errors import AfineError, ArgumentParser, command, printable
from afine.evaluation import (
    DEFAULT_CLIP,
    STAGE_PARTS,
    add_model_arguments,
    check_model_arguments,
    close_distributed,
    model_files,
    pick_device,
    score_items,
    world,
)
from afine.labels import normalise_pipal_mos, read_mos_folder_numbered
from afine.model import load_afine


def logistic(x: np.ndarray, e1: float, e2: float, g3: float, g4: float) -> np.ndarray:
    """(e1 - e2) / (1 + exp(-(x - g3) / |g4|)) + e2, written with expit so it never overflows."""
    return (e1 - e2) * expit((x - g3) / (abs(g4) + 1e-10)) + e2


def fit_logistic(x, y, e1: float, e2: float) -> tuple[float, float, float]:
    """Least-squares (g3, |g4|) of y ~ logistic(x; e1, e2, g3, g4), start [mean(x), std(x) / 4]; also the RMSE."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or not np.ptp(x) > 0:
        raise AfineError(f"cannot fit the mapping: need at least 2 distinct scores, got {x.size} "
                         f"({'all equal' if x.size else 'none'})")
    start = [float(x.mean()), float(x.std()) / 4]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (g3, g4), _ = optimize.curve_fit(lambda v, a, b: logistic(v, e1, e2, a, b), x, y, p0=start, maxfev=20000)
    except RuntimeError as e:
        raise AfineError(f"the logistic fit did not converge ({e})") from None
    rmse = float(np.sqrt(np.mean((logistic(x, e1, e2, g3, g4) - y) ** 2)))
    return float(g3), abs(float(g4)), rmse


def nr_data(data_root: str | Path) -> tuple[list[tuple[Path, Path]], np.ndarray, list[Path]]:
    """PIPAL training set: (distorted image, its reference) items, the normalised MOS y in [-2, 2], and the MOS
    files read."""
    folder = dataset_dir(data_root, "PIPAL") / "Train" / "MOS"
    records = read_mos_folder_numbered(folder)
    index = ImageIndex(images_dir(data_root, "PIPAL"))
    items = []
    for file, line, r in records:
        if r.dis not in index:
            raise AfineError(f"{file}:{line}: image {r.dis!r} not found under {index.folder}")
        items.append((index[r.dis], index[r.dis]))  # stage 1 scores the image alone
    files = list(dict.fromkeys(file for file, _, _ in records))
    return items, normalise_pipal_mos(np.array([r.mos for _, _, r in records])), files


def scale_data(data_root: str | Path) -> tuple[list[tuple[Path, Path]], np.ndarray, list[Path]]:
    """SRIQA-Bench MOS/ (all scenes): (image, scene original) items, y = 100 - 100 (m - min) / (max - min), and the
    MOS files read."""
    index = Indexes()(images_dir(data_root, "SRIQA-Bench"))
    items, mos = [], []
    files = sriqa_mos_files(data_root, "All")
    for path in files:
        ref, scores, paths = sriqa_scene(path, index)
        items += [(paths[n], ref) for n, _ in scores]
        mos += [s for _, s in scores]
    m = np.array(mos, dtype=np.float64)
    if not np.ptp(m) > 0:
        raise AfineError(f"{dataset_dir(data_root, 'SRIQA-Bench') / 'MOS'}: all MOS values are equal; cannot normalise")
    return items, 100.0 - 100.0 * (m - m.min()) / (m.max() - m.min()), files


MODES = {  # mode -> (stage of the model, data, e1, e2, names of the two parameters)
    "nr": (1, nr_data, 2.0, -2.0, ("yita3", "yita4")),
    "scale": (3, scale_data, 100.0, 0.0, ("center", "width")),
}


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=tuple(MODES), help="nr: NR-mapping start (stage-1 model, PIPAL Train MOS); "
                        "scale: final 0..100 scale (stage-3 model, SRIQA-Bench MOS)")
    parser.add_argument("--out", required=True, help="JSON file to write the fitted parameters to (*.json; '-': "
                        "standard output, the summary then going to stderr)")
    add_model_arguments(parser)
    try:
        args = parser.parse_args(argv)
        check_model_arguments(args)
        stage, data, e1, e2, names = MODES[args.mode]
        items, y, label_files = data(args.data_root)
        inputs = [p for item in items for p in item] + label_files + model_files(args)
        check_writable(args.out, inputs, JSON)  # before the work, not after it, and never over what it reads
        device = pick_device(args.device)
        model = load_afine(args.weights, clip=args.clip, require=STAGE_PARTS[stage], default_clip=DEFAULT_CLIP)
        model = model.to(device)
        x = score_items(model, items, stage, batch_size=args.batch_size, device=device, workers=args.workers,
                        progress=not args.no_progress, desc=args.mode)
        g3, g4, rmse = fit_logistic(x, y, e1, e2)
        if world()[0] == 0:
            print(f"{names[0]} {g3:.6f}\n{names[1]} {g4:.6f}\nimages {len(items)}  rmse {rmse:.6f}  -> "
                  f"{printable(args.out)}", file=printout(args.out))
            write_json(args.out, {names[0]: g3, names[1]: g4, "images": len(items), "rmse": rmse,
                                  "weights": printable(args.weights)})
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
