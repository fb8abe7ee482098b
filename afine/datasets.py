"""Dataset layouts (docs/datasets.md), triplet datasets for training and 2AFC evaluation.

Images are found by file name: one ImageIndex per dataset (per split for DiffIQA) maps names to paths,
searching the images folder recursively. Training triplets are used at full size; each triplet gets
one flip/transpose augmentation shared by its three images, a pure function of (seed, epoch, index),
so DataLoader workers, resumed runs and the batch planner (afine/batches.py) all agree on it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import AfineError
from .image import image_size, load_image
from .labels import SPLITS, compare, read_triplets_numbered

DATASETS = ("DiffIQA", "KADID10K", "PIPAL", "TID2013", "SRIQA-Bench")
DIFFIQA_TYPES = ("PSY", "PNY", "SNY", "PYY", "NYY")
SRIQA_SUBSETS = {"All": "MOS", "Regression": "MOS_Reg", "Generative": "MOS_Gen"}
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


class ImageIndex:
    """File name -> Path for every image under a folder (recursive). Names must be unique."""

    def __init__(self, images_dir: str | Path):
        self.folder = Path(images_dir)
        if not self.folder.is_dir():
            raise AfineError(f"{self.folder}: images folder not found")
        self.paths: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.folder):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                path = Path(dirpath, name)
                if name in self.paths:
                    raise AfineError(f"{path}: image name {name!r} also used by {self.paths[name]}")
                self.paths[name] = path

    def __getitem__(self, name: str) -> Path:
        try:
            return self.paths[name]
        except KeyError:
            raise AfineError(f"image {name!r} not found under {self.folder}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def __len__(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------------------------------------- layout


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise AfineError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise AfineError(f"{path}: {what} not found")
    return path


def dataset_dir(data_root: str | Path, name: str) -> Path:
    """<data_root>/<name> for a dataset in DATASETS, or for any other folder in the traditional layout
    (see traditional_dataset_dir); error if unknown or missing."""
    if name not in DATASETS:
        return traditional_dataset_dir(data_root, name)
    path = Path(data_root) / name
    if not path.is_dir():
        raise AfineError(f"{path}: dataset folder not found")
    return path


TRADITIONAL_LAYOUT = "images/ and Train|Validation|Test/ with MOS/*.txt and Triplet/Triplet.txt, like KADID10K"


def traditional_dataset_dir(data_root: str | Path, name: str) -> Path:
    """<data_root>/<name> for a dataset laid out like KADID10K, PIPAL and TID2013: every image in `images/`,
    split folders `Train/`, `Validation/`, `Test/` (at least one), each with `MOS/*.txt` and `Triplet/Triplet.txt`.

    The split files themselves are checked when read. Errors say why a name is not accepted.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise AfineError(f"unknown dataset {name!r}: a dataset is named by its folder under the data root")
    path = Path(data_root) / name
    known = ", ".join(DATASETS)
    if not path.is_dir():
        raise AfineError(f"unknown dataset {name!r}: no folder {path} (known: {known}; any other dataset needs "
                         f"a folder laid out as {TRADITIONAL_LAYOUT})")
    if not (path / "images").is_dir():
        raise AfineError(f"{path}: not a dataset in the traditional layout (no images/ folder; expected "
                         f"{TRADITIONAL_LAYOUT})")
    if not any((path / split).is_dir() for split in SPLITS):
        raise AfineError(f"{path}: not a dataset in the traditional layout (no Train/, Validation/ or Test/ folder; "
                         f"expected {TRADITIONAL_LAYOUT})")
    return path


def images_dir(data_root: str | Path, dataset: str, split: str | None = None) -> Path:
    """Where a dataset's images live: <dataset>/images, or DiffIQA/<split>/images."""
    root = dataset_dir(data_root, dataset)
    if dataset == "DiffIQA":
        if split is None:
            raise AfineError("DiffIQA keeps images per split; a split is needed")
        _check_split(split)
        return root / split / "images"
    return root / "images"


def triplet_file(data_root: str | Path, dataset: str, split: str) -> Path:
    """The triplet list of a split: <dataset>/<split>/Triplet/Triplet.txt;
    DiffIQA Train: DiffIQA/Train/trainlabel/Triplet/Triplet.txt. Error if missing."""
    _check_split(split)
    root = dataset_dir(data_root, dataset)
    if dataset == "SRIQA-Bench":
        raise AfineError("SRIQA-Bench has no triplet lists; use its MOS files (sriqa_mos_files, sriqa_pairs)")
    if dataset == "DiffIQA" and split == "Train":
        return _existing(root / "Train" / "trainlabel" / "Triplet" / "Triplet.txt", "DiffIQA train triplet list")
    path = root / split / "Triplet" / "Triplet.txt"
    if dataset == "DiffIQA" and not path.is_file():
        raise AfineError(f"{path}: not found; DiffIQA {split} has per-type lists (diffiqa_type_file)")
    return _existing(path, f"{dataset} {split} triplet list")


def diffiqa_type_file(data_root: str | Path, split: str, type: str) -> Path:
    """DiffIQA per-type 4-column list: Train/trainlabel/TripletEachType/<TYPE>.txt for Train,
    <split>/TripletEachType/<TYPE>.txt for Validation and Test."""
    _check_split(split)
    root = dataset_dir(data_root, "DiffIQA")
    folder = root / "Train" / "trainlabel" if split == "Train" else root / split
    return _existing(folder / "TripletEachType" / f"{type}.txt", f"DiffIQA {split} {type} triplet list")


def diffiqa_type_files(data_root: str | Path, split: str) -> dict[str, Path]:
    """Every per-type list present for a DiffIQA split (PSY, PNY, SNY, PYY, NYY first, then any others, sorted)."""
    _check_split(split)
    root = dataset_dir(data_root, "DiffIQA")
    folder = (root / "Train" / "trainlabel" if split == "Train" else root / split) / "TripletEachType"
    found = {p.stem: p for p in folder.glob("*.txt")}
    if not found:
        raise AfineError(f"{folder}: no DiffIQA per-type triplet lists")
    order = [t for t in DIFFIQA_TYPES if t in found] + sorted(set(found) - set(DIFFIQA_TYPES))
    return {t: found[t] for t in order}


def sriqa_mos_files(data_root: str | Path, subset: str = "All") -> list[Path]:
    """SRIQA-Bench MOS files of a subset: All (MOS/), Regression (MOS_Reg/), Generative (MOS_Gen/)."""
    if subset not in SRIQA_SUBSETS:
        raise AfineError(f"unknown SRIQA-Bench subset {subset!r}; expected one of {', '.join(SRIQA_SUBSETS)}")
    folder = dataset_dir(data_root, "SRIQA-Bench") / SRIQA_SUBSETS[subset]
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise AfineError(f"{folder}: no SRIQA-Bench MOS files")
    return files


def sriqa_pairs(scores: list[tuple[str, float]]) -> list[tuple[str, str, float]]:
    """Every unordered pair (a, b, g) of one scene's images, in file order; g from MOS (higher is better)."""
    names = [name for name, _ in scores]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AfineError(f"image {dup!r} is scored twice in one SRIQA-Bench MOS file")
    return [(a, b, compare(sa, sb)) for i, (a, sa) in enumerate(scores) for b, sb in scores[i + 1:]]


# ---------------------------------------------------------------------------------------------- augmentation


_MASK = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fast, well-spread integer hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def augmentation_flags(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """[N, 3] bool (hflip, vflip, transpose) for many triplet indices at once; each flag has p = 0.5."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _mix(np.full(idx.shape, seed & _MASK, dtype=np.uint64))
    h = _mix(h ^ np.uint64(epoch & _MASK))
    h = _mix(h ^ idx)
    bits = np.array([63, 62, 61], dtype=np.uint64)
    return ((h[..., None] >> bits) & np.uint64(1)).astype(bool)


def augmentation(seed: int, epoch: int, index: int) -> tuple[bool, bool, bool]:
    """(hflip, vflip, transpose) of triplet `index` in `epoch`: deterministic, each flag p = 0.5."""
    hflip, vflip, transpose = augmentation_flags(seed, epoch, np.array([index]))[0].tolist()
    return hflip, vflip, transpose


def apply_augmentation(x: torch.Tensor, flags: tuple[bool, bool, bool]) -> torch.Tensor:
    """Horizontal flip, then vertical flip, then transpose (H <-> W) of the last two dims of x."""
    hflip, vflip, transpose = flags
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-1, -2)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------- dataset


TripletItem = tuple[Path, Path, Path, float, float, float]
NO_FLAGS = np.zeros(3, dtype=bool)


class TripletDataset(torch.utils.data.Dataset):
    """Triplets (x1, x2, y, g12, g1y, g2y) of image paths and labels; images at full size.

    Missing g1y / g2y (4-column lists) are NaN. An item is addressed by its index (epoch 0) or by an
    (epoch, index) key; with `augment`, triplet i of epoch e gets augmentation(seed, e, i), identically
    for its three images.
    """

    def __init__(self, items: list[TripletItem], augment: bool = True, seed: int = 0):
        self.items = [(Path(a), Path(b), Path(c), float(g12), float(g1y), float(g2y))
                      for a, b, c, g12, g1y, g2y in items]
        self.augment = augment
        self.seed = seed
        self._flags: dict[int, np.ndarray] = {}  # epoch -> [n, 3], for the last epochs used
        self._sizes: dict[Path, tuple[int, int]] = {}  # header sizes
        self._base: dict[int, tuple[int, int]] = {}  # un-augmented (H, W) of checked triplets

    @classmethod
    def from_lists(cls, data_root: str | Path, datasets: list[str], split: str, augment: bool = True,
                   seed: int = 0) -> TripletDataset:
        """Triplets of several datasets' lists for one split, names resolved via each dataset's ImageIndex.

        DiffIQA Validation/Test without a Triplet/Triplet.txt use the union of their per-type lists.
        """
        if not datasets:
            raise AfineError("no datasets given")
        _check_split(split)
        items: list[TripletItem] = []
        for name in datasets:
            index = ImageIndex(images_dir(data_root, name, split))
            if name == "DiffIQA" and split != "Train" \
                    and not (dataset_dir(data_root, name) / split / "Triplet" / "Triplet.txt").is_file():
                files = list(diffiqa_type_files(data_root, split).values())
            else:
                files = [triplet_file(data_root, name, split)]
            for path in files:
                items += resolve_triplets(path, index)
        return cls(items, augment=augment, seed=seed)

    def __len__(self) -> int:
        return len(self.items)

    def flags(self, key: int | tuple[int, int]) -> np.ndarray:
        """(hflip, vflip, transpose) of a triplet (index, or (epoch, index))."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not self.augment:
            return NO_FLAGS
        if epoch not in self._flags:
            if len(self._flags) > 2:
                self._flags.clear()
            self._flags[epoch] = augmentation_flags(self.seed, epoch, np.arange(len(self.items)))
        return self._flags[epoch][i]

    def _size(self, path: Path) -> tuple[int, int]:
        size = self._sizes.get(path)
        if size is None:
            size = self._sizes[path] = image_size(path)
        return size

    def base_shape(self, i: int) -> tuple[int, int]:
        """(H, W) of triplet i before augmentation, from the image headers; checks the three sizes agree."""
        shape = self._base.get(i)
        if shape is None:
            paths = self.items[i][:3]
            sizes = [self._size(p) for p in paths]
            _check_sizes(paths, sizes)
            shape = self._base[i] = sizes[0]
        return shape

    def shape(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(H, W) of a triplet after its epoch's augmentation (header sizes, cached; nothing decoded)."""
        h, w = self.base_shape(key[1] if isinstance(key, tuple) else key)
        return (w, h) if self.flags(key)[2] else (h, w)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        p1, p2, py, g12, g1y, g2y = self.items[key[1] if isinstance(key, tuple) else key]
        images = [load_image(p) for p in (p1, p2, py)]
        _check_sizes((p1, p2, py), [tuple(x.shape[-2:]) for x in images])
        flags = tuple(self.flags(key).tolist())
        x1, x2, y = (apply_augmentation(x, flags) for x in images)
        tag = "".join("1" if f else "0" for f in flags)
        return {
            "x1": x1, "x2": x2, "y": y,
            "g12": torch.tensor(g12, dtype=torch.float32),
            "g1y": torch.tensor(g1y, dtype=torch.float32),
            "g2y": torch.tensor(g2y, dtype=torch.float32),
            "keys": (f"{p1}|{tag}", f"{p2}|{tag}", f"{py}|{tag}"),
        }


def _check_sizes(paths, sizes) -> None:
    if len(set(sizes)) != 1:
        described = ", ".join(f"{p} ({h}x{w})" for p, (h, w) in zip(paths, sizes))
        raise AfineError(f"triplet images differ in size: {described}")


def resolve_triplets(path: str | Path, index: ImageIndex) -> list[TripletItem]:
    """Read a triplet list and resolve its names to paths; unknown names are errors naming file and line."""
    items = []
    for line, t in read_triplets_numbered(path):
        paths = []
        for name in (t.x1, t.x2, t.y):
            if name not in index:
                raise AfineError(f"{path}:{line}: image {name!r} not found under {index.folder}")
            paths.append(index[name])
        g1y = math.nan if t.g1y is None else t.g1y
        g2y = math.nan if t.g2y is None else t.g2y
        items.append((*paths, t.g12, g1y, g2y))
    return items


def collate_triplets(items: list[dict]) -> dict:
    """Stack a batch of same-size triplets; 'keys' becomes a list of (k1, k2, ky) tuples."""
    (_, h, w), first = items[0]["x1"].shape, items[0]["keys"][0].rsplit("|", 1)[0]
    for it in items[1:]:
        if it["x1"].shape[-2:] != (h, w):  # the batches were planned by shape from the headers
            other, (oh, ow) = it["keys"][0].rsplit("|", 1)[0], it["x1"].shape[-2:]
            raise AfineError(f"{other}: triplets of different sizes in one batch planned as one shape from the "
                             f"headers, its triplet {ow}x{oh}, {first}'s {w}x{h} (an image changed during the run)")
    batch = {k: torch.stack([it[k] for it in items]) for k in ("x1", "x2", "y", "g12", "g1y", "g2y")}
    batch["keys"] = [it["keys"] for it in items]
    return batch
