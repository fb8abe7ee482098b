"""The whole A-FINE pipeline on a synthetic corpus, on CPU, in a few minutes: no weights or datasets needed.

    python demo.py [--out demo_out] [--seed 0]

1. generate a small synthetic IQA corpus in the official dataset layouts (afine.synth, scale "demo")
2. train stage 1 (CLIP + naturalness head) of a tiny randomly initialised model
3. fit the stage-3 NR-mapping start on the PIPAL-like training MOS (fit_gamma.py nr)
4. train stage 2 (fidelity head) and stage 3 (mappings + adapter) the published way: on cached statistics of the
   frozen CLIP (`cache: true`, docs/training.md, "Cached statistics")
5. evaluate the untrained and the trained model on every synthetic benchmark (evaluate.py --bench all); with
   matplotlib, pictures: the three stages' training curves and a PNG per benchmark (docs/training.md, "Curves";
   docs/evaluation.md, "Evaluation plots")
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MARKER = ".afine-demo"

INTRO = """\
A-FINE demo: the full pipeline on a synthetic corpus with a tiny random CLIP (CPU, a few minutes).
Accuracies here only show that the pipeline learns; real A-FINE scores need OpenAI's CLIP weights
(ViT-B-32.pt, e.g. data/ViT-B-32.pt) and the datasets (DiffIQA, KADID10K, PIPAL, TID2013, SRIQA-Bench)
under one data root such as data/ - see docs/datasets.md and docs/training.md.
"""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*args: str | Path) -> None:
    """Run one of the project's scripts; stop the demo with its exit code if it fails."""
    cmd = [sys.executable, *map(str, args)]
    print("$ " + " ".join(str(a) for a in args), flush=True)
    # one thread per process: the tiny model's operations are too small to share, and on a busy machine
    # two threads waiting on each other make a training step many times slower
    code = subprocess.call(cmd, cwd=ROOT, env={"OMP_NUM_THREADS": "1", **os.environ})
    if code != 0:
        sys.exit(f"error: demo step failed (exit code {code}): {' '.join(map(str, args))}")


def save_untrained_model(path: Path, seed: int) -> None:
    """The model stage 1 starts from (the seeded random tiny CLIP, then the seeded heads), as a merged afine.pth."""
    sys.path.insert(0, str(ROOT))
    import torch

    from afine.checkpoint import RANDOM_TINY, clip_from_spec, save_afine
    from afine.model import AFINE

    clip = clip_from_spec(RANDOM_TINY, seed)
    torch.manual_seed(seed)  # as train_stage1.build_model
    save_afine(path, AFINE(clip).parts())


def prepare_out(out: Path) -> None:
    """A fresh output folder; an earlier demo's folder is replaced, any other folder is left alone."""
    if out.exists():
        if not (out / MARKER).is_file():
            sys.exit(f"error: {out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by demo.py; deleted by the next demo run\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out; replaced each run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    start = time.perf_counter()
    print(INTRO)
    prepare_out(out)
    data, seed = out / "data", str(args.seed)

    step("1/5 synthetic corpus")
    run("-m", "afine.synth", "--out", data, "--seed", seed, "--scale", "demo")

    step("2/5 stage 1: fine-tune the tiny CLIP and train the naturalness head")
    run("train_stage1.py", "--config", "configs/demo_s1.json", f"--data_root={data}", f"--out_dir={out / 's1'}",
        f"--seed={seed}")

    step("3/5 fit_gamma: the NR-mapping start for stage 3")
    run("fit_gamma.py", "nr", "--data-root", data, "--weights", out / "s1", "--out", out / "gamma.json")

    step("4/5 stages 2 and 3: fidelity head, then mappings and adapter, the published way: every distinct image\n"
         "    goes through the frozen CLIP once per augmentation, and the steps train on those cached statistics\n"
         "    (cache: true in configs/demo_s2.json and demo_s3.json; docs/training.md, 'Cached statistics')")
    run("train_stage2.py", "--config", "configs/demo_s2.json", f"--data_root={data}", f"--out_dir={out / 's2'}",
        f"--stage1_dir={out / 's1'}", f"--seed={seed}")
    run("train_stage3.py", "--config", "configs/demo_s3.json", f"--data_root={data}", f"--out_dir={out / 's3'}",
        f"--stage1_dir={out / 's1'}", f"--stage2_dir={out / 's2'}", f"--nr_init_file={out / 'gamma.json'}",
        f"--seed={seed}")

    step("5/5 evaluate on every synthetic benchmark: untrained vs trained")
    save_untrained_model(out / "untrained" / "afine.pth", args.seed)
    plots = importlib.util.find_spec("matplotlib") is not None  # pictures are optional (pip install matplotlib)
    for name, weights in (("untrained", out / "untrained" / "afine.pth"), ("trained", out / "s3")):
        run("evaluate.py", "--bench", "all", "--data-root", data, "--weights", weights, "--json",
            out / f"eval_{name}.json", "--no-progress",
            *(["--plots", out / "plots"] if name == "trained" and plots else []))

    before = json.loads((out / "eval_untrained.json").read_text())
    after = json.loads((out / "eval_trained.json").read_text())
    print(f"\n{'benchmark':<14} {'pairs':>6} {'untrained':>10} {'trained':>9}")
    outcome = {}
    for name in after:
        a, b = before[name]["accuracy"], after[name]["accuracy"]
        outcome[name] = "better" if b > a else "equal" if b == a else "worse"
        print(f"{name:<14} {after[name]['pairs']:>6} {a:>10.3f} {b:>9.3f}  {outcome[name]}")
    mean_before = sum(before[n]["accuracy"] for n in after) / len(after)
    mean_after = sum(after[n]["accuracy"] for n in after) / len(after)
    print(f"{'mean':<14} {'':>6} {mean_before:>10.3f} {mean_after:>9.3f}  "
          f"{100 * (mean_after - mean_before):+.1f} points")
    counts = {k: list(outcome.values()).count(k) for k in ("better", "equal", "worse")}
    print(f"trained vs untrained: better on {counts['better']}, equal on {counts['equal']}, worse on "
          f"{counts['worse']} of {len(after)} benchmarks; total time {time.perf_counter() - start:.0f} s")
    below = []
    for stage in ("s1", "s2", "s3"):  # each stage's validation mean at its start and at its end (log.jsonl)
        val = [r["val_mean"] for r in map(json.loads, (out / stage / "log.jsonl").read_text().splitlines())
               if "val_mean" in r]
        best = json.loads((out / stage / "best" / "best.json").read_text())
        print(f"stage {stage[1]} validation 2AFC mean: step 0 {val[0]:.4f}, final {val[-1]:.4f}, "
              f"best {best['val_mean']:.4f} at step {best['step']} ({stage}/best/)")
        below += [stage[1]] if val[-1] < val[0] else []
    if below:
        print(f"(stage {', '.join(below)} ended below its step-0 validation on this seed. The tiny CLIP, trained from\n"
              " scratch, learns a naturalness that carries over only in part to the held-out references, and\n"
              " stage 3 learns how much to trust it; docs/training.md, 'The demo')")
    print("(the untrained model's naturalness head is flat, so it ranks by fidelity alone; that fails where the\n"
          " reference is worse than the images under test - DiffIQA's P images, SR results that beat SRIQA's\n"
          " Original photo - which is what A-FINE's training fixes. diffiqa-nyy pairs each image with its own\n"
          " reference: fidelity alone is always right there, so 1.000 untrained cannot be beaten)")
    if plots:
        run("-m", "afine", "curves", out / "s1", out / "s2", out / "s3", "--out", out / "curves.png")
        print(f"pictures: {out / 'curves.png'} (training curves of the three stages), {out / 'plots'}/ (one PNG "
              "per benchmark: the trained model's scores against MOS, 2AFC accuracy per SR method / distortion type)")
    else:
        print("(pip install matplotlib to get pictures of the training curves and of the evaluation)")
    print(f"\noutputs in {out}: data/ (corpus), s1/ s2/ s3/ (run folders; s3/afine.pth is the merged model), "
          f"gamma.json, eval_untrained.json, eval_trained.json")
    print(f"score your own pairs with it:  python -m afine score --weights {out / 's3' / 'afine.pth'} DIS REF")


if __name__ == "__main__":
    main()
