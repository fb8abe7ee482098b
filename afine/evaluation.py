"""Cached scoring for evaluation and fit_gamma: every distinct image goes through CLIP once.

A benchmark needs scores u(img, ref) for many (image, reference) items. They all reduce to per-image and
per-item scalars: N_raw(img) (naturalness) and F_raw(img, ref) (fidelity). D follows from those three
scalars through AFINE.terms, so nothing but scalars is cached across pairs, triplets and benchmarks.

Work plan: items are grouped by reference (connected groups of images and references), groups by image
shape; images are encoded in shape-batches in that order, references first. F needs the features of both
images at once: an image's features are kept only until its last item is computed (usually a reference
for the span of its group), so each distinct image goes through CLIP exactly once and memory stays bounded.
Under torchrun the groups are sharded across ranks and the scalars all-gathered.

Scores: stage 1 N_raw(img), stage 2 F_raw(img, ref), stage 3 D(img, ref). Lower is better.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import distributed, interrupts
from .checkpoint import weight_files
from .download import released_path
from .errors import AfineError, unwrap_worker_error
from .image import image_size, load_image
from .model import AFINE, HEADS

STAGES = (1, 2, 3)
STAGE_PARTS = {1: ("natural",), 2: ("fidelity",), 3: HEADS}  # parts each stage's score needs
Item = tuple[Path, Path]  # (image, reference)


@dataclass
class TermCache:
    """Raw per-image terms computed so far: n[img] = N_raw(img), f[(img, ref)] = F_raw(img, ref) (float32 values).

    `encoded` counts CLIP passes (images encoded), for checking the one-pass-per-image floor.
    """

    n: dict[Path, float] = field(default_factory=dict)
    f: dict[Item, float] = field(default_factory=dict)
    encoded: int = 0

    def missing(self, items: list[Item], stage: int) -> tuple[list[Path], list[Item]]:
        """What a stage still needs for these items: images needing N_raw, items needing F_raw."""
        need_n = {1: [i for i, _ in items], 2: [], 3: [p for item in items for p in item]}[stage]
        images = list(dict.fromkeys(p for p in need_n if p not in self.n))
        pairs = [] if stage == 1 else list(dict.fromkeys(it for it in items if it not in self.f))
        return images, pairs


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """This rank's batches of image paths (one shape each), and per batch: the items whose F is computed
    after it (grouped by reference) and the images whose features are dropped after it."""

    batches: list[list[Path]]
    shapes: list[tuple[int, int]]  # batch -> (H, W) its images had when their headers were read
    fidelity: list[dict[Path, list[Path]]]  # batch -> {ref: [images]}
    keep: list[list[Path]]  # batch -> images whose features must outlive the batch
    release: list[list[Path]]  # batch -> images whose kept features are dropped after the batch


def image_sizes(paths: list[Path], threads: int = 8) -> dict[Path, tuple[int, int]]:
    """(H, W) of every image from its header, read concurrently."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(paths, pool.map(image_size, paths)))


def groups(images: list[Path], pairs: list[Item]) -> list[list[Path]]:
    """Images joined by items into groups, each in encoding order: per reference (sorted), the reference
    then its images (sorted); images without items alone. Groups are sorted by their first path."""
    parent: dict[Path, Path] = {p: p for p in images}
    for img, ref in pairs:
        parent.setdefault(img, img)
        parent.setdefault(ref, ref)

    def root(p: Path) -> Path:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for img, ref in pairs:
        a, b = root(img), root(ref)
        if a != b:
            parent[max(a, b)] = min(a, b)
    by_ref: dict[Path, list[Path]] = defaultdict(list)
    for img, ref in pairs:
        by_ref[ref].append(img)
    members: dict[Path, list[Path]] = defaultdict(list)
    for ref in sorted(by_ref):
        members[root(ref)] += [ref, *sorted(by_ref[ref])]
    for p in sorted(parent):
        members[root(p)].append(p)
    return sorted((list(dict.fromkeys(m)) for m in members.values()), key=lambda m: m[0])


def shard(group_list: list[list[Path]], rank: int, world: int) -> list[list[Path]]:
    """This rank's groups: largest first to the least-loaded rank (deterministic, balanced by image count)."""
    if world == 1:
        return group_list
    load = [0] * world
    mine = []
    for g in sorted(group_list, key=lambda g: (-len(g), g[0])):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += len(g)
        if r == rank:
            mine.append(g)
    return sorted(mine, key=lambda g: g[0])


def plan(images: list[Path], pairs: list[Item], batch_size: int, rank: int = 0, world: int = 1) -> Plan:
    """Shape-batched encoding order for N of `images` and F of `pairs` (see the module docstring)."""
    everything = list(dict.fromkeys([*images, *(p for item in pairs for p in item)]))
    sizes = image_sizes(everything)
    for img, ref in pairs:
        if sizes[img] != sizes[ref]:
            (h, w), (rh, rw) = sizes[img], sizes[ref]
            raise AfineError(f"{img} ({h}x{w}) and its reference {ref} ({rh}x{rw}) differ in size")
    mine = shard(groups(images, pairs), rank, world)
    by_shape: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for g in mine:
        by_shape[sizes[g[0]]] += g
    batches = [paths[i:i + batch_size] for shape in sorted(by_shape) for paths in [by_shape[shape]]
               for i in range(0, len(paths), batch_size)]
    shapes = [sizes[batch[0]] for batch in batches]
    where = {p: b for b, batch in enumerate(batches) for p in batch}
    fidelity: list[dict[Path, list[Path]]] = [defaultdict(list) for _ in batches]
    last = dict(where)  # batch after which an image's features are no longer needed
    for img, ref in pairs:
        if img not in where:  # another rank's item
            continue
        due = max(where[img], where[ref])
        fidelity[due][ref].append(img)
        last[img] = max(last[img], due)
        last[ref] = max(last[ref], due)
    keep: list[list[Path]] = [[] for _ in batches]
    release: list[list[Path]] = [[] for _ in batches]
    for p, b in where.items():
        if last[p] > b:
            keep[b].append(p)
            release[last[p]].append(p)
    return Plan(batches, shapes, [dict(f) for f in fidelity], keep, release)


# ---------------------------------------------------------------------------------------------- running


class ImageBatches(torch.utils.data.Dataset):
    """Batch i of a plan, decoded and stacked (for a DataLoader with workers, batch_size=None).

    Every image must decode to its batch's planned (H, W), the size its header had when the work was planned:
    a file rewritten since then is an error naming it (docs/evaluation.md), never a batch that fails to stack
    or, worse, one scored at another size.
    """

    def __init__(self, batches: list[list[Path]], shapes: list[tuple[int, int]]):
        self.batches = batches
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        h, w = self.shapes[i]
        images = []
        for p in self.batches[i]:
            image = load_image(p, warn_size=False)  # the header check warned
            if tuple(image.shape[-2:]) != (h, w):
                raise AfineError(f"{p}: changed during the run: {image.shape[-1]}x{image.shape[-2]} now, {w}x{h} "
                                 f"when checked")
            images.append(image)
        return torch.stack(images)


def loader(batches: list[list[Path]], shapes: list[tuple[int, int]], workers: int, device: torch.device):
    """The plan's decoded batches in order, each of its planned (H, W) `shapes`; a worker's AfineError (a bad or
    changed image) surfaces as its one line."""
    data = torch.utils.data.DataLoader(ImageBatches(batches, shapes), batch_size=None, shuffle=False,
                                       num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    iterator = interrupts.batches(data)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            clean = unwrap_worker_error(e)
            if clean is e:
                raise
            raise clean from None
        yield batch


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.inference_mode()
def compute_terms(model: AFINE, items: list[Item], stage: int, cache: TermCache, batch_size: int = 16,
                  device: str | torch.device = "cpu", workers: int = 0, progress: bool = True,
                  desc: str = "scoring", precision: str = "fp32") -> None:
    """Fill `cache` with what `stage` needs to score `items`; each missing image goes through CLIP once, in
    `precision` (the heads in float32).

    Under torch.distributed the work is sharded by reference group and the results gathered on every rank.
    """
    device = torch.device(device)
    images, pairs = cache.missing(items, stage)
    rank, size = world()
    work = plan(images, pairs, batch_size, rank, size)
    error = None
    try:
        n_new, f_new = _share_terms(model, work, stage, images, device, workers, progress and rank == 0, desc,
                                    precision)
    except AfineError as e:  # under torchrun a bad image on one rank is raised on every rank: none waits for it
        if size == 1:
            raise
        n_new, f_new, error = {}, {}, str(e)
    encoded = sum(len(b) for b in work.batches)
    if size > 1:
        gathered = distributed.gather_objects(distributed.Dist(rank, size), (n_new, f_new, encoded, error))
        errors = [g[3] for g in gathered if g[3] is not None]
        if errors:
            raise AfineError(errors[0])
        n_new, f_new, encoded = {}, {}, 0
        for n_part, f_part, e, _ in gathered:
            n_new.update(n_part)
            f_new.update(f_part)
            encoded += e
    cache.n.update(n_new)
    cache.f.update(f_new)
    cache.encoded += encoded


def _share_terms(model: AFINE, work: Plan, stage: int, images: list[Path], device: torch.device, workers: int,
                 progress: bool, desc: str, precision: str) -> tuple[dict[Path, float], dict[Item, float]]:
    """N_raw and F_raw of this rank's plan: its batches decoded, encoded, scored, in order."""
    n_wanted = set(images) if stage != 3 else None  # stage 3 keeps N of every encoded image
    n_new: dict[Path, float] = {}
    f_new: dict[Item, float] = {}
    kept: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
    total = sum(len(b) for b in work.batches)
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False) as bar:
        for b, pixels in enumerate(loader(work.batches, work.shapes, workers, device)):
            paths = work.batches[b]
            here = {p: i for i, p in enumerate(paths)}
            x, features = model.encode(pixels.to(device, non_blocking=True), precision=precision)
            if stage != 2:
                wanted = [i for i, p in enumerate(paths) if n_wanted is None or p in n_wanted]
                if wanted:
                    values = model.natural(x[wanted], features[wanted]).float().cpu().tolist()
                    n_new.update((paths[i], v) for i, v in zip(wanted, values))
            for ref, imgs in work.fidelity[b].items():  # F of the items due now, one call per reference
                xi, fi = _gather(imgs, here, x, features, kept)
                xr, fr = _gather([ref], here, x, features, kept)
                values = model.fidelity(xi, fi, xr, fr).float().cpu().tolist()
                f_new.update(((img, ref), v) for img, v in zip(imgs, values))
            for p in work.keep[b]:
                kept[p] = (x[here[p]].clone(), features[here[p]].clone())
            for p in work.release[b]:
                kept.pop(p, None)
            bar.update(len(paths))
    return n_new, f_new


def _gather(paths: list[Path], here: dict[Path, int], x: torch.Tensor, features: torch.Tensor,
            kept: dict[Path, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images and features of `paths`, from the current batch (`here`) or the kept ones."""
    if all(p in here for p in paths):
        index = torch.tensor([here[p] for p in paths], device=x.device)
        return x.index_select(0, index), features.index_select(0, index)
    got = [(x[here[p]], features[here[p]]) if p in here else kept[p] for p in paths]
    return torch.stack([g[0] for g in got]), torch.stack([g[1] for g in got])


@torch.inference_mode()
def item_scores(model: AFINE, cache: TermCache, items: list[Item], stage: int) -> np.ndarray:
    """Scores of (image, reference) items from cached terms: N_raw, F_raw or D by stage (float32 values)."""
    if not items:
        return np.zeros(0)
    if stage == 1:
        return np.array([cache.n[img] for img, _ in items], dtype=np.float32).astype(np.float64)
    f = np.array([cache.f[it] for it in items], dtype=np.float32)
    if stage == 2:
        return f.astype(np.float64)
    n_img = np.array([cache.n[img] for img, _ in items], dtype=np.float32)
    n_ref = np.array([cache.n[ref] for _, ref in items], dtype=np.float32)
    device = next(model.parameters()).device
    d = model.terms(*(torch.from_numpy(a).to(device) for a in (n_img, n_ref, f)))["afine_all"]
    return d.float().cpu().numpy().astype(np.float64)


def score_items(model: AFINE, items: list[Item], stage: int, cache: TermCache | None = None, **kwargs) -> np.ndarray:
    """compute_terms then item_scores: the stage's score of every (image, reference) item."""
    cache = cache if cache is not None else TermCache()
    compute_terms(model, items, stage, cache, **kwargs)
    return item_scores(model, cache, items, stage)


# ---------------------------------------------------------------------------------------------- direct scoring


@torch.inference_mode()
def triplet_scores(model: AFINE, x1: Path, x2: Path, y: Path, stage: int,
                   device: str | torch.device = "cpu") -> tuple[float, float]:
    """The official tester's way: decode and encode the triplet's three images, score (x1, y) and (x2, y)."""
    images = torch.stack([load_image(p) for p in (x1, x2, y)]).to(device)
    x, features = model.encode(images)
    if stage == 1:
        n = model.natural(x[:2], features[:2])
        return float(n[0]), float(n[1])
    f = model.fidelity(x[:2], features[:2], x[2:], features[2:])
    if stage == 2:
        return float(f[0]), float(f[1])
    n = model.natural(x, features)
    d = model.terms(n[:2], n[2:].expand(2), f)["afine_all"]
    return float(d[0]), float(d[1])


# ---------------------------------------------------------------------------------------------- distributed


def init_distributed(requested: str | None = None) -> torch.device | None:
    """Join torchrun's process group (afine.distributed.setup); None when not launched by torchrun.

    nccl on cuda:LOCAL_RANK when CUDA is available and no CPU device was requested, else gloo on the CPU.
    Returns the rank's device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return None
    return distributed.setup("cpu" if (requested or "").startswith("cpu") else "auto").device


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


DEFAULT_CLIP = "data/ViT-B-32.pt"  # as in the training configs; read only when the weights hold no CLIP


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of evaluate.py and fit_gamma.py; the defaults are the training configs' paths."""
    parser.add_argument("--data-root", default="data", help="folder holding the dataset folders (default data)")
    parser.add_argument("--weights", default="data/afine.pth",
                        help="merged afine.pth or a training run folder (default data/afine.pth)")
    parser.add_argument("--clip", help="CLIP checkpoint, if the weights hold no fine-tuned CLIP "
                        f"(default {DEFAULT_CLIP})")
    parser.add_argument("--batch-size", type=int, default=16, help="images per CLIP batch (default 16)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image-decoding DataLoader workers (default min(4, cores))")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_model_arguments(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.batch_size < 1:
        raise AfineError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise AfineError(f"--workers must be 0 or more, got {args.workers}")
    if not Path(args.data_root).is_dir():
        raise AfineError(f"{args.data_root}: data folder not found (--data-root points elsewhere)")
    if not Path(args.weights).exists():
        released = released_path()
        hint = f"; the released afine.pth that `afine score` uses is {released}" if released.is_file() else ""
        raise AfineError(f"{args.weights}: A-FINE weights not found (--weights points elsewhere{hint})")


def model_files(args: argparse.Namespace) -> list[Path]:
    """Every file the model arguments may read: the weights (afine.pth or a run folder's files) and the CLIP."""
    return weight_files(args.weights) + [Path(args.clip or DEFAULT_CLIP)]


USE = "use cpu, cuda or cuda:N"


def check_device(requested: str | None) -> torch.device:
    """The device `--device` names (default: cuda when available, else cpu), or one error line when nothing can
    be scored on it here: a name torch does not know, the meta device (it holds no data), CUDA without a CUDA
    device or with an index past the last, a CPU index other than 0, a device type this machine lacks."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise AfineError(f"--device {name}: not a device name ({USE})") from None
    if device.type == "meta":
        raise AfineError(f"--device {name}: the meta device holds no data, nothing can be scored on it ({USE})")
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise AfineError(f"--device {name}: there is one CPU device, cpu or cpu:0")
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AfineError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if (device.index or 0) >= count:
            raise AfineError(f"--device {name}: no such CUDA device, this machine has {count} "
                             f"({'cuda:0' if count == 1 else f'cuda:0 to cuda:{count - 1}'})")
        return device
    try:  # another type (mps, xpu, ...): usable if it holds a tensor and gives it back
        torch.ones(1, device=device).cpu()
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
        why = str(e).splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise AfineError(f"--device {name}: not usable here ({why}; {USE})") from None
    return device


def pick_device(requested: str | None) -> torch.device:
    """The device to compute on: `requested` once check_device accepts it, or under torchrun this process's
    (cuda:LOCAL_RANK, or the CPU; joining torchrun's process group, init_distributed)."""
    device = check_device(requested)  # before joining: a bad --device is refused whether or not under torchrun
    joined = init_distributed(requested)
    return device if joined is None else joined
