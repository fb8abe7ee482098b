"""Pictures of training and evaluation drawn with matplotlib (docs/training.md, "Curves";
docs/evaluation.md, "Evaluation plots").

- Curves: `python -m afine curves RUN [RUN ...] --out curves.png` draws the training loss and the validation
  mean against step of one or several run folders (their log.jsonl; a run still going is read as far as it
  got), one colour per run, each run's best validation marked.
- Benchmarks: `evaluate.py --plots DIR` writes DIR/<benchmark>.png: for MOS-labelled sets the score against
  MOS with the 4-parameter logistic that PLCC is computed after; for pairs whose file names tell the SR method
  or the distortion type, the 2AFC accuracy of each.

matplotlib is optional (`pip install '.[plots]'`): it is imported only when a picture is drawn, and drawn off
screen (the Agg canvas, no pyplot), so no display is needed. A picture is written in the format its file name's
suffix names (.png, .pdf, .svg, ...: afine.atomic.PICTURES).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .atomic import PICTURES, atomic_write, check_not_input, check_writable, destination, printout
from .benchmarks import SRIQA, Benchmark
from .errors import AfineError, optional_import
from .metrics import fit_logistic4, logistic4, two_afc_correct
from .runfolder import read_log

DPI = 100
PANEL = (6.4, 4.8)  # inches per panel of a benchmark's picture: 640 x 480 pixels at DPI
CURVES = (12.0, 4.5)  # inches of the curves picture (two panels): 1200 x 450 pixels at DPI


def require_matplotlib(what: str) -> None:
    """One AfineError saying how to install matplotlib when it is missing; `what` is the command asking for it."""
    optional_import("matplotlib", "matplotlib", "plots", what)


def figure(size: tuple[float, float], what: str):
    """An empty matplotlib Figure of `size` inches on the off-screen Agg canvas."""
    require_matplotlib(what)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def picture_format(path: str | Path) -> str:
    """The format the name of the file written says (a link's target's name; PICTURES), else PNG: '-', a FIFO."""
    suffix = destination(path)[1].suffix.lower()
    return suffix[1:] if suffix in PICTURES else "png"


def save_picture(fig, path: str | Path) -> None:
    kind = picture_format(path)
    atomic_write(path, lambda f: fig.savefig(f, format=kind, dpi=DPI))


# ---------------------------------------------------------------------------------------------- training curves


def run_curves(run: Path) -> dict:
    """A run folder's (or log.jsonl file's) curves: loss and validation mean per step, and the best validation."""
    log = run / "log.jsonl" if run.is_dir() else run
    if not log.is_file():
        raise AfineError(f"{run}: no log.jsonl; expected a training run folder (out_dir) or its log.jsonl")
    records = read_log(log)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_mean"]) for r in records if "val_mean" in r]
    best = [(r["step"], r["val_mean"]) for r in records if "best" in r]
    return {"loss": losses, "val": val, "best": best[-1] if best else None}


def run_names(runs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name (runs/a/s1, runs/b/s1)."""
    names = [(run if run.is_dir() else run.parent).name or str(run) for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def draw_curves(runs: list[Path], out: str | Path) -> None:
    """One picture in the format `out`'s suffix names (PNG for '-'): training loss (left) and validation 2AFC mean
    (right) against step, one colour per run, each run's best validation (the one log.jsonl marks "best") starred."""
    curves = [run_curves(run) for run in runs]
    if not any(c["loss"] or c["val"] for c in curves):
        raise AfineError(f"{', '.join(map(str, runs))}: nothing logged yet (no training step or validation)")
    fig = figure(CURVES, "python -m afine curves")
    loss_ax, val_ax = fig.subplots(1, 2)
    for k, (name, c) in enumerate(zip(run_names(runs), curves)):
        colour = f"C{k % 10}"
        if c["loss"]:
            loss_ax.plot(*zip(*c["loss"]), color=colour, linewidth=1, label=name)
        if c["val"]:
            val_ax.plot(*zip(*c["val"]), color=colour, marker="o", markersize=3, linewidth=1, label=name)
        if c["best"]:
            step, mean = c["best"]
            val_ax.plot([step], [mean], color=colour, marker="*", markersize=14, markeredgecolor="black",
                        linestyle="none")
            val_ax.annotate(f"best {mean:.3f} @ {step}", (step, mean), textcoords="offset points", xytext=(6, 6),
                            fontsize=8, color=colour)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss (mean over the global batch)")
    val_ax.set(title="validation 2AFC accuracy, mean over datasets (star: best)", xlabel="step", ylabel="accuracy")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    (loss_ax if any(c["loss"] for c in curves) else val_ax).legend(fontsize=8)
    save_picture(fig, out)


def curves_command(args: argparse.Namespace) -> int:
    """`python -m afine curves RUN [RUN ...] --out PICTURE` (arguments in afine/__main__.py)."""
    require_matplotlib("python -m afine curves")
    runs = [Path(r) for r in args.runs]
    check_writable(args.out, [run / "log.jsonl" if run.is_dir() else run for run in runs], PICTURES)
    draw_curves(runs, args.out)  # as given: '-' is standard output, './-' a file
    print(f"wrote {args.out}", file=printout(args.out))
    return 0


# ---------------------------------------------------------------------------------------------- benchmark plots


def image_groups(bench: Benchmark) -> tuple[str, dict[Path, str]] | None:
    """What the file names of a benchmark's pairs tell about their test images, or None where they do not:

    - SRIQA-Bench: ("SR method", image -> method) from <scene>_<Method>x4.png; the scene's reference
      <scene>_Original.png, which its pairs include, is "Original".
    - any other benchmark whose every test image is named <reference stem>_<type>_<level>: ("distortion type",
      image -> type), as in KADID-10k (I01_03_02.png: type 03) and TID2013 (i01_03_2.bmp); the reference
      itself has none. DiffIQA's names (<reference stem>_<NN>) do not say, and give None.
    """
    sriqa = bench.name in SRIQA
    groups = {}
    for image, ref in zip(bench.x1 + bench.x2, bench.y + bench.y):
        if image == ref and not sriqa:
            continue
        stem = ref.stem.removesuffix("_Original") if sriqa else ref.stem
        if not image.stem.lower().startswith(stem.lower() + "_"):
            return None
        rest = image.stem[len(stem) + 1:]
        fields = rest.split("_")
        if sriqa and (rest == "Original" or (rest.endswith("x4") and len(rest) > 2)):
            groups[image] = rest.removesuffix("x4")
        elif not sriqa and len(fields) == 2 and all(fields):
            groups[image] = fields[0]
        else:
            return None
    return ("SR method" if sriqa else "distortion type", groups) if groups else None


def group_accuracy(bench: Benchmark, scores: dict, groups: dict[Path, str]) -> dict[str, tuple[int, int]]:
    """label -> (correct, pairs) over the pairs that hold an image of that label (a pair of two labels counts
    for both), ordered by label (numbers by value, the SRIQA "Original" first)."""
    u1 = [scores[it] for it in zip(bench.x1, bench.y)]
    u2 = [scores[it] for it in zip(bench.x2, bench.y)]
    correct = two_afc_correct(u1, u2, bench.g)
    first = np.array([groups.get(p, "") for p in bench.x1], dtype=object)
    second = np.array([groups.get(p, "") for p in bench.x2], dtype=object)
    labels = sorted(set(groups.values()), key=lambda s: (s != "Original", s.zfill(12)))
    return {label: (int(correct[hit].sum()), int(hit.sum()))
            for label in labels for hit in [(first == label) | (second == label)]}


def number(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def mos_panel(ax, bench: Benchmark, scores: dict, result: dict, score_name: str) -> None:
    """Score against MOS with the fitted 4-parameter logistic (of -score, as for PLCC); SRCC and PLCC in the title."""
    x = np.array([scores[it] for it in zip(bench.mos_images, bench.mos_refs)])
    ax.scatter(x, bench.mos, s=10, alpha=0.6, label="images")
    if not math.isnan(result.get("plcc", math.nan)):
        line = np.linspace(x.min(), x.max(), 200)
        ax.plot(line, logistic4(-line, *fit_logistic4(-x, bench.mos)), color="black", linewidth=1.5,
                label="4-parameter logistic fit")
        ax.legend(fontsize=8)
    ax.set(title=f"{bench.name}: SRCC {number(result.get('srcc'))}, PLCC {number(result.get('plcc'))} "
                 f"({len(x)} images)", xlabel=f"{score_name} (lower is better)", ylabel="MOS (higher is better)")
    ax.grid(alpha=0.3)


def accuracy_panel(ax, bench: Benchmark, scores: dict, result: dict, found: tuple | None) -> None:
    """2AFC accuracy per SR method or distortion type where the names tell them (`found`, from image_groups),
    else one bar for all pairs."""
    title = f"{bench.name}: 2AFC accuracy {number(result['accuracy'])} ({result['pairs']} pairs)"
    if found is None:
        ax.bar([0], [result["accuracy"]], color="C1", width=0.5)
        ax.set_xticks([0], ["all pairs"])
        ax.set(title=title, ylabel="2AFC accuracy", xlim=(-1.5, 1.5), ylim=(0, 1))
    else:
        kind, groups = found
        counts = group_accuracy(bench, scores, groups)
        labels = list(counts)
        ax.bar(range(len(labels)), [c / n if n else math.nan for c, n in counts.values()], color="C1")
        crowded = sum(map(len, labels)) > 40
        ax.set_xticks(range(len(labels)), labels, rotation=45 if crowded else 0, ha="right" if crowded else "center",
                      fontsize=8)
        ax.axhline(result["accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"all pairs {number(result['accuracy'])}")
        ax.legend(fontsize=8, loc="best")
        ax.set(title=title, xlabel=f"{kind} (pairs holding an image of it)", ylabel="2AFC accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3, axis="y")


def benchmark_plot(bench: Benchmark, scores: dict, result: dict, score_name: str, path: Path) -> None:
    """One PNG per benchmark: the MOS panel (MOS-labelled sets) beside the 2AFC panel where names tell groups;
    DiffIQA (no MOS, no groups) one bar. Each panel is PANEL inches."""
    mos, found = bench.mos is not None, image_groups(bench)
    bars = not mos or found is not None
    fig = figure((PANEL[0] * (mos + bars), PANEL[1]), "evaluate.py --plots")
    axes = list(np.atleast_1d(fig.subplots(1, mos + bars)))
    if mos:
        mos_panel(axes.pop(0), bench, scores, result, score_name)
    if bars:
        accuracy_panel(axes.pop(0), bench, scores, result, found)
    save_picture(fig, path)


def check_plots(folder: str | Path, names: list[str], inputs: Iterable[str | Path] = ()) -> None:
    """Before the work: matplotlib is there and the folder takes every benchmark's picture, none of them over one
    of `inputs`, the files the command reads."""
    require_matplotlib("evaluate.py --plots")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise AfineError(f"{folder}: --plots names a file, expected a folder")
    paths = [Path(folder) / f"{name}.png" for name in names]
    for path in paths:
        check_writable(path)
    check_not_input(paths, inputs)


def benchmark_plots(benches: list[Benchmark], scores: dict[str, dict], results: dict[str, dict], score_name: str,
                    folder: str | Path) -> list[Path]:
    """folder/<benchmark>.png for every evaluated benchmark (`scores`: benchmark -> {(image, ref): score})."""
    paths = []
    for bench in benches:
        path = Path(folder) / f"{bench.name}.png"
        benchmark_plot(bench, scores[bench.name], results[bench.name], score_name, path)
        paths.append(path)
    return paths
