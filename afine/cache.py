"""Cached statistics of the frozen networks, so stages 2 and 3 train without running CLIP every step.

In stage 2 the CLIP is frozen and the fidelity head's output for a pair (x, y) under augmentation a is
1 - (a . S1 + b . S2) with S1, S2 (sum(chns) values each) depending only on the pair, the augmentation and
the CLIP. In stage 3 CLIP and both heads are frozen: only N_raw(x1), N_raw(x2), N_raw(y), F_raw(x1, y) and
F_raw(x2, y) enter the mappings and the adapter. Both are computed here once per distinct (pair, augmentation)
of a triplet list, the 8 augmentations being the combinations of hflip, vflip and transpose (slot
h + 2v + 4t; validation lists have only slot 0), and read back per step for the step's (epoch, index) keys,
so a cached run trains on the same triplets and augmentations as an uncached one (docs/training.md, "Cached
statistics").

One entry (folder) per list and kind under the cache folder, named <kind>-<list>-<key>:
- kind "similarity" (stage 2): similarity.npy [P, A, 2 sum(chns)] float16 (S1 then S2 of pair p, slot a);
  a pair whose test image is its reference gets S1 = S2 = 1 without an encode (what the head computes: S1 is
  exactly 1, S2 within a few 1e-6 of 1, which float16 rounds to 1).
- kind "scores" (stage 3): pair_scores.npy [P, A, 2] float32 (N_raw(test), F_raw(test, ref)) and
  ref_scores.npy [R, A] float32 (N_raw(ref)).
- manifest.json, written last and atomically, with each data file's size and the SHA-256 of its `.npy` header:
  without it (a killed build) the entry is rebuilt; a file whose size or header no longer matches (damaged
  since) is rebuilt with a warning.
The key is the SHA-256 of the kind, the format version, the frozen files' digests, the CLIP precision (amp),
the augmentation slots, and the ordered pairs with each image's path, size, modification time, inode and
change time (ctime, which no tool can set back): a changed stage-1 CLIP, head, image list or image gives
another entry, never stale statistics.

Building: pairs are grouped by image shape into units of at most `images_per_pass` distinct images, each
unit's images decoded once and encoded once per augmentation. Under torchrun the units are dealt to the
ranks, which write their rows into the same memory-mapped files (a shared file system, as for out_dir); rank
0 writes the manifest after a barrier, and every rank then memory-maps the entry read-only. A complete entry is
read without taking the lock, so a read-only cache_dir serves the entries it holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .atomic import reason, write_json
from .batches import shape_groups
from .datasets import TripletDataset, apply_augmentation
from .distributed import Dist
from .errors import AfineError, warn
from .evaluation import loader as image_loader
from .model import AFINE

VERSION = 2
SIMILARITY, SCORES = "similarity", "scores"  # stage 2, stage 3
FILES = {SIMILARITY: ("similarity.npy",), SCORES: ("pair_scores.npy", "ref_scores.npy")}
AUGMENTATIONS = [(bool(a & 1), bool(a & 2), bool(a & 4)) for a in range(8)]  # slot h + 2v + 4t


# ---------------------------------------------------------------------------------------------- pairs of a list


@dataclass
class PairTable:
    """The distinct (test, reference) pairs of a triplet list and where each triplet's pairs are."""

    pairs: list[tuple[Path, Path]]  # sorted by reference, then test image
    refs: list[Path]  # sorted
    pair_ref: np.ndarray  # [P] index into refs
    triplets: np.ndarray  # [n, 3]: pair of (x1, y), pair of (x2, y), reference y
    g12: np.ndarray  # [n] float32 labels
    first: np.ndarray  # [P] a triplet holding the pair (for its image shape)


def pair_table(data: TripletDataset) -> PairTable:
    ordered = sorted({(str(y), str(x)) for x1, x2, y, *_ in data.items for x in (x1, x2)})
    pairs = [(Path(x), Path(y)) for y, x in ordered]
    refs = sorted({y for _, y in pairs}, key=str)
    pair_id = {pair: p for p, pair in enumerate(pairs)}
    ref_id = {ref: r for r, ref in enumerate(refs)}
    triplets = np.array([(pair_id[(x1, y)], pair_id[(x2, y)], ref_id[y]) for x1, x2, y, *_ in data.items],
                        dtype=np.int64).reshape(-1, 3)
    first = np.zeros(len(pairs), dtype=np.int64)
    for column in (1, 0):  # a triplet holding the pair: all of them have the pair's image shape
        first[triplets[:, column]] = np.arange(len(triplets))
    return PairTable(pairs, refs, np.array([ref_id[y] for _, y in pairs], dtype=np.int64), triplets,
                     np.array([item[3] for item in data.items], dtype=np.float32), first)


def slots(data: TripletDataset, keys: list) -> np.ndarray:
    """Augmentation slot (h + 2v + 4t) of each triplet key, exactly as the dataset augments it."""
    flags = np.array([data.flags(key) for key in keys], dtype=np.int64).reshape(-1, 3)
    return flags @ np.array([1, 2, 4])


def cache_key(kind: str, table: PairTable, frozen: dict[str, str], amp: str, augmentations: int) -> str:
    """SHA-256 of everything the entry's numbers depend on; image files by path, size, modification time, inode
    and change time (a stat per file: hashing every image's contents would read the whole dataset at every start;
    a rewrite whose size and modification time were set back, as `touch -r` and sync tools do, still changes
    the change time, and a replacement the inode)."""
    files = {}
    for path in dict.fromkeys(p for pair in table.pairs for p in pair):
        try:
            st = path.stat()
        except OSError as e:
            raise AfineError(f"{path}: cannot read image ({reason(e)})") from None
        files[str(path.resolve())] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    record = {"version": VERSION, "kind": kind, "frozen": sorted(frozen.values()), "amp": amp,
              "augmentations": augmentations, "pairs": [[str(x), str(y)] for x, y in table.pairs], "files": files}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- reading


class CachedList:
    """One list's entry, memory-mapped read-only; `read(keys)` gives what a step or validation batch needs."""

    def __init__(self, kind: str, folder: Path, data: TripletDataset, table: PairTable):
        self.kind, self.folder, self.data, self.table = kind, folder, data, table
        self.arrays = {name: np.load(folder / name, mmap_mode="r") for name in FILES[kind]}
        self.augmentations = next(iter(self.arrays.values())).shape[1]

    def read(self, keys: list) -> dict:
        """Triplet keys ((epoch, index) or index) -> {"g12": [B]} and, for "similarity", "similarity"
        [2, B, 2C] float16 (pairs (x1, y), then (x2, y)); for "scores", "natural" [3, B] (x1, x2, y) and
        "fidelity" [2, B] float32."""
        index = np.array([key[1] if isinstance(key, tuple) else key for key in keys], dtype=np.int64)
        slot = slots(self.data, keys)
        if slot.max(initial=0) >= self.augmentations:
            raise AfineError(f"{self.folder}: holds no augmented statistics (a validation list's entry)")
        pairs = self.table.triplets[index, :2].T.reshape(-1)  # x1 pairs, then x2 pairs
        batch = {"g12": torch.from_numpy(self.table.g12[index])}
        if self.kind == SIMILARITY:
            rows = self.arrays["similarity.npy"][pairs, np.tile(slot, 2)]
            batch["similarity"] = torch.from_numpy(rows).view(2, len(keys), -1)
        else:
            scores = torch.from_numpy(self.arrays["pair_scores.npy"][pairs, np.tile(slot, 2)]).view(2, len(keys), 2)
            ref = torch.from_numpy(self.arrays["ref_scores.npy"][self.table.triplets[index, 2], slot])
            batch["natural"] = torch.cat([scores[..., 0], ref[None]])
            batch["fidelity"] = scores[..., 1]
        return batch

    @property
    def bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# ---------------------------------------------------------------------------------------------- opening, building


def entry_name(kind: str, name: str, key: str) -> str:
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{key[:16]}"


INCOMPLETE = "incomplete"


def npy_header(path: Path) -> list:
    """[length, SHA-256] of a `.npy` file's header (magic, version, dtype, order, shape): what numpy parses."""
    with open(path, "rb") as f:
        start = f.read(10)  # magic (6), version (2), header length (2, or 4 from version 2)
        length = 10 + int.from_bytes(start[8:10], "little") if start[6:7] == b"\x01" else \
            12 + int.from_bytes(start[8:10] + f.read(2), "little")
        f.seek(0)
        return [length, hashlib.sha256(f.read(min(length, 1 << 20))).hexdigest()]


def entry_problem(folder: Path, key: str) -> str | None:
    """None if the entry is complete; INCOMPLETE if it has no manifest for `key` (never built, or a build killed
    halfway); else what no longer matches its manifest (a data file's size or header: damaged since)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("key") != key:
            return INCOMPLETE
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return INCOMPLETE
    for name, recorded in files.items():
        try:
            if (folder / name).stat().st_size != recorded["bytes"]:
                return f"{name} is not of the size the manifest records"
            if npy_header(folder / name) != recorded["header"]:
                return f"the header of {name} differs from the one the manifest records"
        except (OSError, KeyError, TypeError):
            return f"{name} is missing or unreadable"
    return None


def open_or_build(kind: str, root: str | Path, name: str, data: TripletDataset, model: AFINE, frozen: dict[str, str],
                  d: Dist, amp: str = "off", images_per_pass: int = 384, workers: int = 0, own_root: bool = False,
                  progress: bool = True) -> CachedList:
    """The list's entry under `root`, built first if missing, stale, half-written or damaged (every rank calls this).

    kind: SIMILARITY (stage 2) or SCORES (stage 3); frozen: {file: SHA-256} of the frozen networks; lists with
    augmentation (training) get 8 slots, others 1. `own_root` (the run folder's own cache): entries of the same
    kind and list under another key are stale and removed. Rank 0 holds a lock on the entry while building, so
    runs sharing a cache_dir wait for each other instead of writing one entry twice; a complete entry is opened
    without it (a read-only cache_dir serves its entries).
    """
    root = Path(root)
    table = pair_table(data)
    augmentations = 8 if data.augment else 1
    key = cache_key(kind, table, frozen, amp, augmentations)
    folder = root / entry_name(kind, name, key)
    lock, plan = None, None
    if d.is_main:
        try:
            problem = entry_problem(folder, key)
            if problem is not None:  # built under the lock; a complete entry is read without it
                lock = _lock(root, folder)
                problem = entry_problem(folder, key)  # another run may have built it meanwhile
            plan = ("open",) if problem is None else ("build",)
            if problem not in (None, INCOMPLETE):
                warn(f"{folder}: cache entry damaged ({problem}); rebuilding it")
            if plan[0] == "build":
                _create(kind, folder, table, augmentations, model, own_root)
        except AfineError as e:
            plan = ("error", str(e))
    plan = distributed.broadcast_object(d, plan)
    try:
        if plan[0] == "error":
            raise AfineError(plan[1])
        if plan[0] == "build":
            _build(kind, folder, name, data, table, augmentations, model, d, amp, images_per_pass, workers, progress)
            distributed.barrier(d)
            if d.is_main:
                write_json(folder / "manifest.json", {
                    "version": VERSION, "kind": kind, "list": name, "key": key, "frozen": frozen, "amp": amp,
                    "pairs": len(table.pairs), "references": len(table.refs), "augmentations": augmentations,
                    "files": {f: {"bytes": (folder / f).stat().st_size, "header": npy_header(folder / f)}
                              for f in FILES[kind]}})
            distributed.barrier(d)
        return CachedList(kind, folder, data, table)
    finally:
        if lock is not None:
            lock.close()


def _lock(root: Path, folder: Path):
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / f".{folder.name}.lock", "a+")
    except OSError as e:
        raise AfineError(f"{root}: cannot use as cache_dir ({reason(e)})") from None
    try:  # a POSIX record lock: held by this process alone (not by its forked image loaders), freed when it dies
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"{folder}: another run is building this cache; waiting for it", file=sys.stderr)
        fcntl.lockf(handle, fcntl.LOCK_EX)
    return handle


def _create(kind: str, folder: Path, table: PairTable, augmentations: int, model: AFINE, own_root: bool) -> None:
    """An empty entry (rank 0): the old folder removed, data files allocated; the manifest comes last."""
    if own_root:  # the same kind and list under another key
        prefix = folder.name[:-16]
        for stale in folder.parent.iterdir():
            if stale.name[:-16] == prefix and re.fullmatch("[0-9a-f]{16}", stale.name[-16:]) and stale != folder:
                shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    shapes = {SIMILARITY: {"similarity.npy": ((len(table.pairs), augmentations, 2 * sum(model.fidelity.chns)),
                                              np.float16)},
              SCORES: {"pair_scores.npy": ((len(table.pairs), augmentations, 2), np.float32),
                       "ref_scores.npy": ((len(table.refs), augmentations), np.float32)}}[kind]
    try:
        folder.mkdir(parents=True)
        for name, (shape, dtype) in shapes.items():
            array = np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=shape)
            size = array.offset + array.nbytes
            del array
            with open(folder / name, "r+b") as f, contextlib.suppress(AttributeError):
                try:  # claim the space now: a full disk is an error here, not a crash while writing the map
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise AfineError(f"{folder}: cannot write the cache ({reason(e)}; it needs "
                         f"{sum(np.prod(s) * np.dtype(t).itemsize for s, t in shapes.values()) / 1e9:.2f} GB)") \
            from None


def units(data: TripletDataset, table: PairTable, images_per_pass: int) -> list[list[int]]:
    """Pairs in batches of one image shape holding at most `images_per_pass` distinct images (pairs of a
    reference together): each unit's images are decoded once and encoded once per augmentation."""
    cap = max(2, images_per_pass)
    out = []
    for pairs in shape_groups(list(range(len(table.pairs))), lambda p: data.base_shape(int(table.first[p]))):
        unit: list[int] = []
        images: set[Path] = set()
        for p in pairs:
            pair = set(table.pairs[p])
            if unit and len(images | pair) > cap:
                out.append(unit)
                unit, images = [], set()
            unit.append(p)
            images |= pair
        out.append(unit)
    return out


@torch.no_grad()
def _build(kind: str, folder: Path, name: str, data: TripletDataset, table: PairTable, augmentations: int,
           model: AFINE, d: Dist, amp: str, images_per_pass: int, workers: int, progress: bool) -> None:
    """This rank's share of the units: decode, then per augmentation encode and write the unit's rows."""
    mine = units(data, table, images_per_pass)[d.rank::d.world_size]
    paths = [list(dict.fromkeys(p for q in unit for p in (table.pairs[q][1], table.pairs[q][0]))) for unit in mine]
    arrays = {f: np.load(folder / f, mmap_mode="r+") for f in FILES[kind]}
    bar = tqdm(total=sum(map(len, paths)) * augmentations, desc=f"caching {name}", unit="img", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and d.is_main), leave=False)
    shapes = [data.base_shape(int(table.first[unit[0]])) for unit in mine]  # units() grouped them by it
    for unit, unit_paths, images in zip(mine, paths, image_loader(paths, shapes, workers, d.device)):
        where = {p: i for i, p in enumerate(unit_paths)}
        ids = np.array(unit, dtype=np.int64)
        dis = torch.tensor([where[table.pairs[q][0]] for q in unit], device=d.device)
        ref = torch.tensor([where[table.pairs[q][1]] for q in unit], device=d.device)
        images = images.to(d.device, non_blocking=True)
        for slot in range(augmentations):
            x, features = model.encode(apply_augmentation(images, AUGMENTATIONS[slot]), precision=amp)
            if kind == SIMILARITY:
                _write_similarities(arrays["similarity.npy"], ids, slot, model, x, features, dis, ref, table, folder)
            else:
                n = model.natural(x, features)
                f = model.fidelity(x[dis], features[dis], x[ref], features[ref])
                arrays["pair_scores.npy"][ids, slot] = torch.stack([n[dis], f], 1).cpu().numpy()
                arrays["ref_scores.npy"][table.pair_ref[ids], slot] = n[ref].cpu().numpy()
            bar.update(len(unit_paths))
    bar.close()
    for array in arrays.values():
        array.flush()


def _write_similarities(rows: np.ndarray, ids: np.ndarray, slot: int, model: AFINE, x: torch.Tensor,
                        features: torch.Tensor, dis: torch.Tensor, ref: torch.Tensor, table: PairTable,
                        folder: Path) -> None:
    """S1, S2 of the unit's pairs in float16; a pair whose test image is its reference gets exactly 1."""
    same = (dis == ref).cpu().numpy()
    out = np.ones((len(ids), rows.shape[2]), dtype=np.float16)
    if not same.all():
        keep = torch.from_numpy(~same).to(dis.device)
        d, r = dis[keep], ref[keep]
        s1, s2 = model.fidelity.similarities(x[d], features[d], x[r], features[r])
        values = torch.cat([s1, s2], dim=1)
        half = values.half()
        bad = torch.isfinite(values).all(1) & ~torch.isfinite(half).all(1)
        if bad.any():
            pair = table.pairs[int(ids[~same][int(bad.nonzero()[0])])]
            raise AfineError(f"{folder}: a similarity of {pair[0]} against {pair[1]} exceeds float16's range "
                             "(a constant image?); train this list with cache: false")
        out[~same] = half.cpu().numpy()
    rows[ids, slot] = out


def open_caches(kind: str, cfg, data: TripletDataset, val_sets: list[tuple[str, TripletDataset]], model: AFINE,
                frozen: dict[str, str], d: Dist) -> tuple[CachedList, list[CachedList]]:
    """A stage's entries: its training list and each validation list, under cfg.cache_dir (default: the run
    folder's cache/), built with the run's CLIP precision, images per pass and decoding workers."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"
    settings = {"root": root, "model": model, "frozen": frozen, "d": d, "amp": cfg.amp, "workers": cfg.workers,
                "images_per_pass": cfg.micro_batch or 3 * cfg.batch_size, "own_root": not cfg.cache_dir}
    train = open_or_build(kind, name="train", data=data, **settings)
    return train, [open_or_build(kind, name=f"val-{name}", data=v, **settings) for name, v in val_sets]
