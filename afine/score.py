"""`afine score` (or `python -m afine score`): A-FINE scores for (dis, ref) image pairs, batched, from the shell.

    afine score dis.png ref.png                       # the released weights, downloaded on first use
    afine score --pairs pairs.txt --json > scores.jsonl
    afine score --weights runs/s3 results/ references/ --csv scores.csv
    torchrun --nproc_per_node=4 -m afine score results/ references/ --csv scores.csv

Folders are paired by file name (afine/folders.py). File names that are not UTF-8 are shown escaped in the table,
CSV and JSON (afine.errors.printable). An output file that is one of the inputs is refused before any work.
Under torchrun every process scores its share of the batches on its own device and rank 0 prints and writes what
one process would (docs/scoring.md, "Score on many devices").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from tqdm import tqdm

from . import distributed
from .atomic import CSV, check_writable, printout, write_text
from .checkpoint import weight_files
from .compiled import compile_model
from .download import released_path, released_weights
from .errors import AfineError, printable, report, warn
from .evaluation import close_distributed, pick_device, world
from .folders import image_pairs, listing
from .image import image_size, load_image
from .model import AFINE, PRECISIONS, TERMS, check_weights, load_afine

T = TypeVar("T")


def read_pairs(file: str | Path) -> list[tuple[Path, Path]]:
    """Lines `dis,ref` (blank lines and `#` comments skipped); relative paths are relative to the file's folder,
    or to the working folder for '-' (standard input) and a file that is not in a folder of files: a FIFO or
    device, or a file read through /dev or /proc (/dev/stdin, /dev/fd/3, <(...))."""
    stdin, file = isinstance(file, str) and file == "-", Path(file)  # './-' is a file of that name
    name = "standard input" if stdin else file
    try:
        data = sys.stdin.buffer.read() if stdin else file.read_bytes()
        lines = data.decode("utf-8-sig").splitlines()  # a byte-order mark is not part of the first path
    except OSError as e:
        raise AfineError(f"{name}: cannot read pairs file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AfineError(f"{name}: cannot read pairs file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    base = file.parent if not stdin and in_a_folder(file) else Path()
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 or not all(fields):
            raise AfineError(f"{name}:{number}: expected 'dis,ref', got {line.strip()!r}")
        pairs.append(tuple(base / f for f in fields))
    if not pairs:
        raise AfineError(f"{name}: no pairs")
    return pairs


def is_regular(file: str | Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(file).st_mode)
    except OSError:
        return False


def in_a_folder(file: Path) -> bool:
    """Whether a pairs file's folder is where its relative paths point: a regular file, not read through /dev or
    /proc (where /dev/stdin and /dev/fd/N lead to whatever the shell gave the command)."""
    folder = os.path.realpath(file.parent)
    return is_regular(file) and folder != "/dev" and not folder.startswith("/proc/")


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


class Batch(NamedTuple):
    """One decoded batch: the pairs that decoded as planned (`scored`), their test images, their distinct
    references, each test image's reference index; and the pairs left out (`unscored`: pair index -> why)."""
    scored: list[int]
    dis: torch.Tensor
    refs: torch.Tensor
    ref_index: torch.Tensor
    unscored: dict[int, str]


def decode(path: Path, size: tuple[int, int]) -> torch.Tensor | str:
    """The image, or why it cannot be scored: unreadable, or not the size its header had when the pairs were
    checked (a file changed during the run)."""
    try:
        image = load_image(path, warn_size=False)  # check_pairs warned from the header
    except AfineError as e:
        why = str(e)
        return why[len(f"{path}: "):] if why.startswith(f"{path}: ") else why
    if tuple(image.shape[-2:]) != tuple(size):
        return (f"changed during the run: {image.shape[-1]}x{image.shape[-2]} now, {size[1]}x{size[0]} when "
                f"checked")
    return image


def load_batch(pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]], batch: list[int],
               pin: bool = False) -> Batch:
    """Decode one batch. A pair whose test image or reference is unreadable or has changed size since
    check_pairs read its header is left out, so the rest of the batch and of the run are still scored.

    `pin` puts the images in pinned memory, for an asynchronous copy to a CUDA device."""
    planned = {path: sizes[i] for i in batch for path in pairs[i]}  # each distinct image decoded once
    images = {path: decode(path, size) for path, size in planned.items()}
    scored, unscored = [], {}
    for i in batch:
        dis, ref = pairs[i]
        if isinstance(images[dis], str):
            unscored[i] = f"{dis} ({images[dis]})"
        elif isinstance(images[ref], str):
            unscored[i] = f"{dis} (its reference {ref}: {images[ref]})"
        else:
            scored.append(i)
    refs = list(dict.fromkeys(pairs[i][1] for i in scored))
    where = {ref: j for j, ref in enumerate(refs)}
    if not scored:
        return Batch([], torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), unscored)
    dis = torch.stack([images[pairs[i][0]] for i in scored])
    refs = torch.stack([images[r] for r in refs])
    if pin:
        dis, refs = dis.pin_memory(), refs.pin_memory()
    return Batch(scored, dis, refs, torch.tensor([where[pairs[i][1]] for i in scored]), unscored)


def default_workers(device: torch.device) -> int:
    """Decoding threads: 2 on a CPU, where CLIP takes 30-90 times as long as decoding (docs/scoring.md, "Speed");
    with CUDA, which runs CLIP faster than a few cores decode, up to 8, sharing the cores with the node's other
    processes."""
    if device.type != "cuda":
        return 2
    return max(2, min(8, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def decoded_batches(pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]], batches: list[list[int]],
                    workers: int, pin: bool = False) -> Iterator[Batch]:
    """The batches decoded, in order: `workers` threads decode the next batches while the model runs, one batch
    each (0: each batch is decoded when it is due). Threads rather than DataLoader processes: Pillow and torch
    release the GIL while they work, threads hand their tensors over without a copy and start at once, and they
    measured faster (docs/scoring.md, "Speed")."""
    if workers == 0:
        yield from (load_batch(pairs, sizes, batch, pin) for batch in batches)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = deque(pool.submit(load_batch, pairs, sizes, batch, pin) for batch in batches[:workers])
        for batch in batches[workers:]:
            ready = pending.popleft().result()
            pending.append(pool.submit(load_batch, pairs, sizes, batch, pin))
            yield ready
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@torch.inference_mode()
def score_batches(model: AFINE, pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]],
                  batches: list[list[int]], device: torch.device, precision: str, workers: int, progress: bool,
                  unit: str = "pair") -> tuple[dict[int, list[float]], dict[int, str]]:
    """The five terms of the pairs in `batches` (lists of pair indices, one image size each), by pair index, and
    the pairs of those batches left unscored (load_batch), with why; the progress bar counts pairs, as `unit`s."""
    results, unscored = {}, {}
    with tqdm(total=sum(map(len, batches)), desc="scoring", unit=unit, disable=not progress,
              file=sys.stderr) as bar:
        for batch in decoded_batches(pairs, sizes, batches, workers, pin=device.type == "cuda"):
            unscored.update(batch.unscored)
            if batch.scored:
                terms = model.score(batch.dis.to(device, non_blocking=True), batch.refs.to(device, non_blocking=True),
                                    batch.ref_index, precision=precision)
                results.update(zip(batch.scored,
                                   torch.stack([terms[t] for t in TERMS], dim=1).double().cpu().tolist()))
            bar.update(len(batch.scored) + len(batch.unscored))
    return results, unscored


def score_pairs(model: AFINE, pairs: list[tuple[Path, Path]], batch_size: int = 8,
                device: str | torch.device = "cpu", progress: bool = True, precision: str = "fp32",
                workers: int = 2, sizes: list[tuple[int, int]] | None = None
                ) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """The five terms of every pair scored, by pair index, and the pairs left unscored, with why (an image
    unreadable or changed in size since its header was checked: load_batch); `workers` threads decode the next
    batches while CLIP runs. `sizes`: the pairs' image sizes, if check_pairs already read them.

    Under torchrun (afine.evaluation.init_distributed) process r of R scores batches r, r + R, ... of the plan
    and every process gets every result: the batches, and so the values, are those of one process.
    """
    sizes = check_pairs(pairs) if sizes is None else sizes
    return score_planned(model, pairs, sizes, plan_batches(pairs, sizes, batch_size), device, progress, precision,
                         workers)


def score_planned(model: AFINE, pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]],
                  batches: list[list[int]], device: str | torch.device = "cpu", progress: bool = True,
                  precision: str = "fp32", workers: int = 2, unit: str = "pair"
                  ) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """score_pairs in the given batches (lists of pair indices, one image size each): the five terms of every pair
    scored, by pair index, and the pairs left unscored, with why. Under torchrun process r of R scores batches
    r, r + R, ... and every process gets every result."""
    rank, size = world()
    d = distributed.Dist(rank=rank, world_size=size)
    mine = distributed.agree(d, score_batches, model, pairs, sizes, batches[rank::size], torch.device(device),
                             precision, workers, progress and rank == 0, unit)
    parts = distributed.gather_objects(d, mine)
    values = {i: row for part, _ in parts for i, row in part.items()}
    unscored = {i: why for _, part in parts for i, why in part.items()}
    return ({i: dict(zip(TERMS, values[i])) for i in range(len(pairs)) if i in values},
            {i: unscored[i] for i in sorted(unscored)})


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
    parser.add_argument("--csv", metavar="FILE", help="also write the scores to this CSV file (*.csv; '-': standard "
                        "output, the table then going to stderr)")
    parser.add_argument("--pairs", help="file of 'dis,ref' lines (paths relative to the file's folder; '-': standard "
                        "input, paths relative to the working folder)")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per pair per line")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model and how it runs, shared with `afine compare`."""
    add_weights_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch (default 8)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="CLIP's precision: fp32 (default, exact), bf16 or fp16 autocast (faster where the "
                             "hardware has it; heads in float32; docs/scoring.md, \"Precision\")")
    parser.add_argument("--compile", action="store_true",
                        help="compile CLIP with torch.compile, once per image size and batch (worth it for large "
                             "jobs only: docs/scoring.md, \"Compiled kernels\")")
    parser.add_argument("--workers", type=int,
                        help="threads decoding the next batches while CLIP runs, one batch each (default: 2 on a CPU, "
                             "up to 8 with CUDA; 0: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """--clip, --weights and --offline: which model, as every command that loads one takes them."""
    parser.add_argument("--clip", help="CLIP checkpoint (OpenAI ViT-B-32.pt or a state-dict file), for weights "
                        "without a fine-tuned CLIP")
    parser.add_argument("--weights", help="A-FINE weights: afine.pth or a folder of net_*.pth files (default: the "
                        "released afine.pth, downloaded on first use to $AFINE_WEIGHTS or the torch hub cache)")
    parser.add_argument("--offline", action="store_true",
                        help="never download the released weights (also AFINE_OFFLINE=1 or HF_HUB_OFFLINE=1)")


def run(args: argparse.Namespace) -> int:
    """Score and print; under torchrun only rank 0 prints and writes (run_ranks). Pairs left unscored (an image
    changed during the run) are reported after the others' scores, never instead of them (left_out)."""

    def work(d: distributed.Dist) -> tuple[list[tuple[Path, Path]], list[dict[str, float]], dict[int, str]]:
        pairs, sizes, model = distributed.agree(d, prepare, args, d.device)
        scores, unscored = score_pairs(model, pairs, args.batch_size, d.device, progress=not args.no_progress,
                                       precision=args.precision, sizes=sizes,
                                       workers=default_workers(d.device) if args.workers is None else args.workers)
        if not scores:
            raise AfineError(f"no pair scored: {listing(list(unscored.values()))}")
        pairs, results = [pairs[i] for i in scores], list(scores.values())
        check_finite(pairs, results)
        return pairs, results, unscored

    return run_ranks(args.device, work, lambda done: write_results(args, *done[:2]),
                     lambda d, done: left_out(args, done[2], len(done[1]), d) if done[2] else 0)


def run_ranks(device: str, work: Callable[[distributed.Dist], T], write: Callable[[T], None],
              after: Callable[[distributed.Dist, T], int] | None = None) -> int:
    """`work(d)` on every process (d: its rank and device), then `write(result)` on rank 0 alone, then
    `after(d, result)` on every process for the exit code; the other ranks print nothing. An error any rank meets
    is raised on every rank (afine.distributed.agree, which `work` uses around its steps): rank 0 reports it, and
    the others exit with the same code once it has, since torchrun stops every process as soon as one exits."""
    device = pick_device(device)
    rank, size = world()
    d = distributed.Dist(rank=rank, world_size=size, device=device)
    try:
        with silenced(rank != 0):
            try:
                result = work(d)
            except AfineError as e:
                if size == 1:
                    raise
                if rank == 0:
                    report(e)
                distributed.barrier(d)
                return 2
        if rank == 0:
            write(result)
        return after(d, result) if after is not None else 0
    finally:
        close_distributed()


def left_out(args: argparse.Namespace, unscored: dict[int, str], scored: int, d: distributed.Dist) -> int:
    """Report the pairs left unscored (an image unreadable or changed since its header was checked) once the
    others' scores are out: an error (exit 2), or with --skip-unpaired a warning listing them like the images
    skipped for want of a partner (exit 0)."""
    entries = listing(list(unscored.values()))
    if args.skip_unpaired:
        if d.rank == 0:
            warn(f"skipped {len(unscored)} image(s): {entries}")
        return 0
    hint = "; --skip-unpaired makes this a warning" if not args.pairs and Path(args.images[0]).is_dir() else ""
    error = AfineError(f"{len(unscored)} pair(s) not scored (the {scored} others are in the output): {entries}{hint}")
    if not d.active:
        raise error
    if d.rank == 0:
        report(error)
    distributed.barrier(d)
    return 2


def prepare(args: argparse.Namespace,
            device: torch.device) -> tuple[list[tuple[Path, Path]], list[tuple[int, int]], AFINE]:
    """The pairs, their image sizes (every header checked) and the model on `device`."""
    if args.pairs and args.images:
        raise AfineError("give either DIS REF or --pairs FILE, not both")
    if args.pairs and args.skip_unpaired:
        raise AfineError("--skip-unpaired applies to folders (DIS_DIR REF_DIR), not to --pairs")
    if args.pairs and world()[1] > 1 and not (args.pairs != "-" and is_regular(args.pairs)):
        raise AfineError(f"--pairs {args.pairs}: standard input, a pipe or a device is read once, not by each of "
                         f"{world()[1]} processes; give a pairs file")
    if args.pairs:
        pairs = read_pairs(args.pairs)
    elif len(args.images) == 2:
        pairs = image_pairs(*args.images, skip_unpaired=args.skip_unpaired)
    else:
        raise AfineError("give DIS REF (images, or folders paired by name) or --pairs FILE")
    if args.csv:  # before the work, not after it; never over an image, the pairs file or the weights
        inputs = [p for pair in pairs for p in pair] + ([Path(args.pairs)] if args.pairs else [])
        check_writable(args.csv, inputs + model_files(args), CSV)
    check_numbers(args)
    sizes = check_pairs(pairs)  # fail on a bad image before loading (or downloading) a large model
    return pairs, sizes, load_model(args, device)


def check_numbers(args: argparse.Namespace) -> None:
    """One error line for a batch size or a number of workers that cannot be."""
    if args.batch_size < 1:
        raise AfineError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise AfineError(f"--workers must be 0 or more, got {args.workers}")


def model_files(args: argparse.Namespace) -> list[Path]:
    """The files loading the model reads: the weights (those given, or the released file) and the CLIP."""
    weights = args.weights if args.weights is not None else released_path()
    return weight_files(weights) + ([Path(args.clip)] if args.clip else [])


def load_model(args: argparse.Namespace, device: torch.device) -> AFINE:
    """The model the options name, on `device` (compiled with --compile): the released weights are downloaded on
    first use."""
    weights = (args.weights if args.weights is not None
               else released_weights(args.offline, not args.no_progress, check=check_weights))
    model = load_afine(weights, clip=args.clip).to(device)
    return compile_model(model) if args.compile else model


def write_results(args: argparse.Namespace, pairs: list[tuple[Path, Path]], results: list[dict[str, float]]) -> None:
    """The table (or JSON lines) on stdout, then the CSV file if asked for; with `--csv -` the CSV is standard
    output's alone and the table (or JSON lines) goes to stderr."""
    shown = printout(args.csv)
    if args.json:
        print("\n".join(json.dumps({"dis": printable(d), "ref": printable(r), **res})
                        for (d, r), res in zip(pairs, results)), file=shown)
    else:
        print(format_table(pairs, results), file=shown)
        if len(results) > 1:
            print(mean_row(pairs, results), file=shown)
    if args.csv:
        write_csv(args.csv, pairs, results)


@contextlib.contextmanager
def silenced(quiet: bool) -> Iterator[None]:
    """stdout and stderr to the null device while `quiet` (the ranks other than 0: their warnings are rank 0's)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield
