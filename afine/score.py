"""`afine score` (or `python -m afine score`): A-FINE scores for (dis, ref) image pairs, batched, from the shell.

    afine score dis.png ref.png                       # the released weights, downloaded on first use
    afine score --pairs pairs.txt --json > scores.jsonl
    afine score --weights runs/s3 results/ references/ --csv scores.csv

Folders are paired by file name (afine/folders.py). File names that are not UTF-8 are shown escaped in the table,
CSV and JSON (afine.errors.printable). An output file that is one of the inputs is refused before any work.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import check_writable, write_text
from .checkpoint import weight_files
from .download import released_path, released_weights
from .errors import AfineError, printable
from .folders import image_pairs
from .image import image_size, load_image
from .model import AFINE, TERMS, load_afine


def read_pairs(file: str | Path) -> list[tuple[Path, Path]]:
    """Lines `dis,ref` (blank lines and `#` comments skipped); relative paths are relative to the file's folder."""
    file = Path(file)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first path
    except OSError as e:
        raise AfineError(f"{file}: cannot read pairs file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AfineError(f"{file}: cannot read pairs file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or not all(fields):
            raise AfineError(f"{file}:{number}: expected 'dis,ref', got {line.strip()!r}")
        pairs.append(tuple(file.parent / f for f in fields))
    if not pairs:
        raise AfineError(f"{file}: no pairs")
    return pairs


def plan_batches(pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Pair indices grouped into batches of one image size, pairs that share a reference kept together."""
    order = sorted(range(len(pairs)), key=lambda i: (sizes[i], str(pairs[i][1]), i))
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or sizes[current[0]] != sizes[i]):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def check_pairs(pairs: list[tuple[Path, Path]]) -> list[tuple[int, int]]:
    """Every image readable and each dis the size of its ref, checked from headers before any scoring."""
    header = {}
    sizes = []
    for dis, ref in pairs:
        for path in (dis, ref):
            if path not in header:
                header[path] = image_size(path)
        if header[dis] != header[ref]:
            raise AfineError(f"{dis}: size {header[dis][1]}x{header[dis][0]} differs from reference {ref} "
                             f"({header[ref][1]}x{header[ref][0]})")
        sizes.append(header[dis])
    return sizes


def load_batch(pairs: list[tuple[Path, Path]], batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode one batch: test images, its distinct references, and each test image's reference index."""
    refs = list(dict.fromkeys(pairs[i][1] for i in batch))
    where = {ref: j for j, ref in enumerate(refs)}
    dis = torch.stack([load_image(pairs[i][0]) for i in batch])
    return dis, torch.stack([load_image(r) for r in refs]), torch.tensor([where[pairs[i][1]] for i in batch])


@torch.inference_mode()
def score_pairs(model: AFINE, pairs: list[tuple[Path, Path]], batch_size: int = 8,
                device: str | torch.device = "cpu", progress: bool = True) -> list[dict[str, float]]:
    """The five terms for every pair, in input order; decoding of the next batch overlaps scoring."""
    sizes = check_pairs(pairs)
    batches = plan_batches(pairs, sizes, batch_size)
    results: list[dict[str, float] | None] = [None] * len(pairs)
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=len(pairs), desc="scoring", unit="pair",
                                                         disable=not progress, file=sys.stderr) as bar:
        pending = pool.submit(load_batch, pairs, batches[0]) if batches else None
        for n, batch in enumerate(batches):
            dis, refs, ref_index = pending.result()
            if n + 1 < len(batches):
                pending = pool.submit(load_batch, pairs, batches[n + 1])
            terms = model.score(dis.to(device), refs.to(device), ref_index)
            values = torch.stack([terms[t] for t in TERMS], dim=1).double().cpu().tolist()
            for i, row in zip(batch, values):
                results[i] = dict(zip(TERMS, row))
            bar.update(len(batch))
    return results


def check_finite(pairs: list[tuple[Path, Path]], results: list[dict[str, float]]) -> None:
    """A NaN or infinite score (broken weights, overflow) is an error naming the pair, never printed as a score."""
    for (dis, ref), res in zip(pairs, results):
        bad = [t for t in TERMS if not math.isfinite(res[t])]
        if bad:
            raise AfineError(f"{dis}: non-finite score against reference {ref} ({bad[0]} = {res[bad[0]]}); "
                             f"check the weights")


def format_table(pairs: list[tuple[Path, Path]], results: list[dict[str, float]]) -> str:
    names = [(printable(d), printable(r)) for d, r in pairs]
    wd = max([3] + [len(d) for d, _ in names])
    wr = max([3] + [len(r) for _, r in names])
    lines = [f"{'dis':<{wd}}  {'ref':<{wr}}  " + "  ".join(f"{t:>15}" for t in TERMS)]
    for (d, r), res in zip(names, results):
        lines.append(f"{d:<{wd}}  {r:<{wr}}  " + "  ".join(f"{res[t]:>15.6f}" for t in TERMS))
    return "\n".join(lines)


def mean_row(pairs: list[tuple[Path, Path]], results: list[dict[str, float]]) -> str:
    """The table's last row: the mean of every term, aligned with format_table's columns."""
    wd = max([3] + [len(printable(d)) for d, _ in pairs])
    wr = max([3] + [len(printable(r)) for _, r in pairs])
    means = [sum(res[t] for res in results) / len(results) for t in TERMS]
    return f"{'mean':<{wd}}  {f'({len(results)} pairs)':<{wr}}  " + "  ".join(f"{m:>15.6f}" for m in means)


def write_csv(path: str | Path, pairs: list[tuple[Path, Path]], results: list[dict[str, float]]) -> None:
    """A spreadsheet of the scores: a header `dis,ref,<terms>` and one row per pair, in input order."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["dis", "ref", *TERMS])
    writer.writerows([printable(d), printable(r), *(repr(res[t]) for t in TERMS)]
                     for (d, r), res in zip(pairs, results))
    write_text(path, text.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="DIS REF",
                        help="a test image and its reference; or a folder of test images and a folder of references "
                             "(paired by file name, or by stem with any image suffix) or one reference image")
    parser.add_argument("--skip-unpaired", action="store_true",
                        help="with folders: skip images without a partner (listed in a warning) instead of failing")
    parser.add_argument("--csv", metavar="FILE", help="also write the scores to this CSV file")
    parser.add_argument("--pairs", help="file of 'dis,ref' lines (paths relative to the file's folder)")
    parser.add_argument("--clip", help="CLIP checkpoint (OpenAI ViT-B-32.pt or a state-dict file), for weights "
                        "without a fine-tuned CLIP")
    parser.add_argument("--weights", help="A-FINE weights: afine.pth or a folder of net_*.pth files (default: the "
                        "released afine.pth, downloaded on first use to $AFINE_WEIGHTS or the torch hub cache)")
    parser.add_argument("--offline", action="store_true",
                        help="never download the released weights (also AFINE_OFFLINE=1 or HF_HUB_OFFLINE=1)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch (default 8)")
    parser.add_argument("--json", action="store_true", help="one JSON object per pair per line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.pairs and args.images:
        raise AfineError("give either DIS REF or --pairs FILE, not both")
    if args.pairs and args.skip_unpaired:
        raise AfineError("--skip-unpaired applies to folders (DIS_DIR REF_DIR), not to --pairs")
    if args.pairs:
        pairs = read_pairs(args.pairs)
    elif len(args.images) == 2:
        pairs = image_pairs(*args.images, skip_unpaired=args.skip_unpaired)
    else:
        raise AfineError("give DIS REF (images, or folders paired by name) or --pairs FILE")
    if args.csv:  # before the work, not after it; never over an image, the pairs file or the weights
        inputs = [p for pair in pairs for p in pair] + [Path(f) for f in (args.pairs, args.clip) if f]
        check_writable(args.csv, inputs + weight_files(args.weights if args.weights is not None else released_path()))
    if args.batch_size < 1:
        raise AfineError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise AfineError(f"--device {args.device}: not usable ({str(e).splitlines()[0]})") from None
    check_pairs(pairs)  # fail on a bad image before loading (or downloading) a large model
    weights = args.weights if args.weights is not None else released_weights(args.offline, not args.no_progress)
    model = load_afine(args.clip, weights).to(device)
    results = score_pairs(model, pairs, args.batch_size, device, progress=not args.no_progress)
    check_finite(pairs, results)
    if args.json:
        print("\n".join(json.dumps({"dis": printable(d), "ref": printable(r), **res})
                        for (d, r), res in zip(pairs, results)))
    else:
        print(format_table(pairs, results))
        if len(results) > 1:
            print(mean_row(pairs, results))
    if args.csv:
        write_csv(args.csv, pairs, results)
    return 0
