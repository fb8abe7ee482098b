"""The published 2AFC benchmarks (docs/evaluation.md): which label file each reads and how its pairs are built.

A benchmark is a list of labelled pairs (x1, x2) sharing a reference y, plus, for MOS-labelled test sets,
per-image MOS with each image's reference (for SRCC / PLCC / KRCC).

- sriqa-all / sriqa-reg / sriqa-gen: SRIQA-Bench MOS/, MOS_Reg/, MOS_Gen/. Every unordered pair inside each
  MOS file (the original included), reference <scene>_Original.png with <scene> the MOS file's stem;
  g from MOS (higher is better, equal -> 0.5). MOS correlations over all listed images, scenes pooled.
- diffiqa-psy, -pny, -sny, -pyy, -nyy: DiffIQA/Test/TripletEachType/<TYPE>.txt, columns x1,x2,y,g12.
- kadid10k, tid2013, pipal: <dataset>/Test/Triplet/Triplet.txt, column g12, pairs (x1, x2) with reference y;
  MOS correlations from <dataset>/Test/MOS/*.txt (dis scored against its ref).
- any other name: a dataset folder of that name under the data root, in the traditional layout
  (afine.datasets.traditional_dataset_dir), read like kadid10k.
Images are found by file name under the dataset's images folder (afine.datasets.ImageIndex).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import (
    SRIQA_SUBSETS,
    ImageIndex,
    dataset_dir,
    diffiqa_type_file,
    images_dir,
    resolve_triplets,
    sriqa_mos_files,
    sriqa_pairs,
    traditional_dataset_dir,
    triplet_file,
)
from .errors import AfineError
from .labels import read_mos_folder_numbered, read_sriqa_mos

SRIQA = {"sriqa-all": "All", "sriqa-reg": "Regression", "sriqa-gen": "Generative"}
DIFFIQA = {"diffiqa-psy": "PSY", "diffiqa-pny": "PNY", "diffiqa-sny": "SNY", "diffiqa-pyy": "PYY",
           "diffiqa-nyy": "NYY"}
TRADITIONAL = {"kadid10k": "KADID10K", "tid2013": "TID2013", "pipal": "PIPAL"}
BENCHMARKS = (*SRIQA, *DIFFIQA, *TRADITIONAL)


@dataclass
class Benchmark:
    """Labelled pairs (x1[i], x2[i]) with reference y[i] and label g[i]; optional per-image MOS items."""

    name: str
    x1: list[Path]
    x2: list[Path]
    y: list[Path]
    g: np.ndarray
    mos_images: list[Path] = field(default_factory=list)  # scored against mos_refs, compared with mos
    mos_refs: list[Path] = field(default_factory=list)
    mos: np.ndarray | None = None
    label_files: list[Path] = field(default_factory=list)  # every label file read, for outputs never to overwrite

    def items(self) -> list[tuple[Path, Path]]:
        """Every (image, reference) whose score this benchmark needs, distinct, in first-use order."""
        pairs = list(zip(self.x1, self.y)) + list(zip(self.x2, self.y)) + list(zip(self.mos_images, self.mos_refs))
        return list(dict.fromkeys(pairs))


def dataset_of(name: str) -> str:
    """The dataset folder a benchmark reads; any name but the published ones is itself a dataset folder name."""
    if name in SRIQA:
        return "SRIQA-Bench"
    if name in DIFFIQA:
        return "DiffIQA"
    if name in TRADITIONAL:
        return TRADITIONAL[name]
    return name


def parse_benchmarks(text: str, data_root: str | Path | None = None) -> list[str]:
    """'all' or a comma list of benchmark names -> names (validated, duplicates dropped, order kept).

    Published names are case-insensitive and 'all' stands for all of them. Any other name must be a folder
    under `data_root` in the traditional layout (case kept); without `data_root` it is an error.
    """
    names = []
    for n in (n.strip() for n in text.split(",")):
        if n.lower() == "all":
            names += BENCHMARKS
        elif n.lower() in BENCHMARKS:
            names.append(n.lower())
        elif n:
            custom_benchmark(data_root, n)
            names.append(n)
    if not names:
        raise AfineError("--bench: no benchmark named")
    return list(dict.fromkeys(names))


def custom_benchmark(data_root: str | Path | None, name: str) -> Path:
    """The folder of a benchmark that is not a published one: a traditional-layout dataset under the data root."""
    published = f"'all', {', '.join(BENCHMARKS)}"
    readers = [b for b in BENCHMARKS if dataset_of(b) == name]
    if readers:
        raise AfineError(f"unknown benchmark {name!r}; the {name} benchmarks are {', '.join(readers)}")
    if data_root is None or not (Path(data_root) / name).is_dir():
        where = "" if data_root is None else f" and no dataset folder {Path(data_root) / name}"
        alike = [] if data_root is None else [p.name for p in Path(data_root).iterdir()
                                              if p.is_dir() and p.name.lower() == name.lower()]
        hint = f" (did you mean {alike[0]!r}? folder names are case-sensitive)" if alike else ""
        raise AfineError(f"unknown benchmark {name!r}: not one of {published}{where}{hint}")
    return traditional_dataset_dir(data_root, name)


def missing_folder(data_root: str | Path, name: str) -> Path | None:
    """The first folder the benchmark needs that is absent (dataset, then its test folder), or None."""
    dataset = Path(data_root) / dataset_of(name)
    test = dataset / ("Test" if name not in SRIQA else SRIQA_SUBSETS[SRIQA[name]])
    return next((folder for folder in (dataset, test) if not folder.is_dir()), None)


class Indexes:
    """One ImageIndex per images folder, built on first use and shared by the benchmarks that read it."""

    def __init__(self):
        self.cache: dict[Path, ImageIndex] = {}

    def __call__(self, folder: Path) -> ImageIndex:
        if folder not in self.cache:
            self.cache[folder] = ImageIndex(folder)
        return self.cache[folder]


def load_benchmark(data_root: str | Path, name: str, indexes: Indexes | None = None) -> Benchmark:
    """Read a benchmark's label files and resolve its image names; errors name the file and line."""
    indexes = indexes or Indexes()
    dataset = dataset_of(name)
    dataset_dir(data_root, dataset)  # error if the folder is missing
    if name in SRIQA:
        return _sriqa(data_root, name, indexes(images_dir(data_root, dataset)))
    if name in DIFFIQA:
        path = diffiqa_type_file(data_root, "Test", DIFFIQA[name])
        return _triplets(name, path, indexes(images_dir(data_root, dataset, "Test")))
    index = indexes(images_dir(data_root, dataset))
    bench = _triplets(name, triplet_file(data_root, dataset, "Test"), index)
    mos_folder = dataset_dir(data_root, dataset) / "Test" / "MOS"
    if mos_folder.is_dir():
        records = read_mos_folder_numbered(mos_folder)
        bench.mos_images = [_find(index, r.dis, f"{file}:{line}") for file, line, r in records]
        bench.mos_refs = [_find(index, r.ref, f"{file}:{line}") for file, line, r in records]
        bench.mos = np.array([r.mos for _, _, r in records], dtype=np.float64)
        bench.label_files += list(dict.fromkeys(file for file, _, _ in records))
    return bench


def _find(index: ImageIndex, name: str, where: str) -> Path:
    if name not in index:
        raise AfineError(f"{where}: image {name!r} not found under {index.folder}")
    return index[name]


def _triplets(name: str, path: Path, index: ImageIndex) -> Benchmark:
    items = resolve_triplets(path, index)
    return Benchmark(name, [t[0] for t in items], [t[1] for t in items], [t[2] for t in items],
                     np.array([t[3] for t in items], dtype=np.float64), label_files=[path])


def sriqa_scene(path: Path, index: ImageIndex) -> tuple[Path, list[tuple[str, float]], dict[str, Path]]:
    """One SRIQA-Bench MOS file -> (reference <stem>_Original.png, [(name, MOS)] in file order, name -> path)."""
    scores = read_sriqa_mos(path)
    ref = _find(index, f"{path.stem}_Original.png", f"{path}: reference of scene {path.stem!r}")
    return ref, scores, {n: _find(index, n, str(path)) for n, _ in scores}


def _sriqa(data_root: str | Path, name: str, index: ImageIndex) -> Benchmark:
    bench = Benchmark(name, [], [], [], np.zeros(0))
    g, mos = [], []
    for path in sriqa_mos_files(data_root, SRIQA[name]):
        bench.label_files.append(path)
        ref, scores, paths = sriqa_scene(path, index)
        for a, b, label in sriqa_pairs(scores):
            bench.x1.append(paths[a])
            bench.x2.append(paths[b])
            bench.y.append(ref)
            g.append(label)
        bench.mos_images += [paths[n] for n, _ in scores]
        bench.mos_refs += [ref] * len(scores)
        mos += [s for _, s in scores]
    bench.g = np.array(g, dtype=np.float64)
    bench.mos = np.array(mos, dtype=np.float64)
    return bench
