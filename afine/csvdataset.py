"""The rows of one CSV of `dis,ref,mos` rows, from which `python -m afine.labels from-csv` makes a dataset in the
traditional layout (like KADID10K): read and checked, the references split, the images placed.

    python -m afine.labels from-csv scores.csv --out data/MyIQA [--seed 0] [--images copy|symlink|hardlink]

The CSV holds one row per distorted image: its path, its reference's path (both relative to the CSV's folder,
or absolute; images may live anywhere) and its MOS (any scale, higher is better). An optional first row
`dis,ref,mos` is a header. Fields may be quoted as spreadsheets write them.

The output folder, which must be new or empty, receives every image in `images/` (copied by default, or
symlinked / hard-linked), and the references split 7:1:2 at random (seeded) into Train, Validation, Test,
each with `MOS/<ref stem>.txt` (`dis,ref,mos` lines) and `Triplet/Triplet.txt` (nlogn triplets). Its folder
name is then a dataset name for training (`train_datasets`, `val_datasets`) and for `evaluate.py --bench`.

Every row is checked before anything is written; a bad one is an AfineError naming the CSV file and line. The
label files are written by afine.labels (dataset_from_csv), which builds the folder beside --out and renames it
into place when complete.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import reason
from .errors import AfineError
from .image import image_size

IMAGE_MODES = {"copy": "copied", "symlink": "symlinked", "hardlink": "hard-linked"}
HEADER = ("dis", "ref", "mos")


@dataclass(frozen=True)
class Row:
    """One CSV row: a distorted image, its reference and its MOS; `line` for messages. Each image file has one
    Path, whatever the spellings of the rows naming it (relative, absolute, through links)."""

    line: int
    dis: Path
    ref: Path
    mos: float


def read_rows(path: str | Path) -> list[Row]:
    """Parse and check the CSV: three fields per row, existing images, a finite MOS, dis != ref."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AfineError(f"{path}: CSV file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AfineError(f"{path}: cannot read CSV file ({e})") from None
    reader = csv.reader(text.splitlines())
    rows = []
    spelled: dict[Path, Path] = {}  # resolved path -> the first spelling of the file, used for every row
    for fields in reader:
        line = reader.line_num
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if not rows and tuple(f.lower() for f in fields) == HEADER:
            continue
        if len(fields) != 3:
            raise AfineError(f"{path}:{line}: expected 3 fields dis,ref,mos, got {len(fields)}")
        dis_name, ref_name, mos_text = fields
        if not dis_name:
            raise AfineError(f"{path}:{line}: no distorted image for reference {ref_name!r}")
        if not ref_name:
            raise AfineError(f"{path}:{line}: no reference for distorted image {dis_name!r}")
        try:
            mos = float(mos_text)
        except ValueError:
            raise AfineError(f"{path}:{line}: MOS {mos_text!r} is not a number") from None
        if not math.isfinite(mos):
            raise AfineError(f"{path}:{line}: MOS {mos_text!r} is not finite")
        dis, ref = path.parent / dis_name, path.parent / ref_name
        for name, image in ((dis_name, dis), (ref_name, ref)):
            if not image.is_file():
                raise AfineError(f"{path}:{line}: image {name!r} not found ({image})")
        dis, ref = (spelled.setdefault(image.resolve(), image) for image in (dis, ref))
        if dis == ref:
            raise AfineError(f"{path}:{line}: reference {ref_name!r} has no distorted image (the row pairs it "
                             f"with itself)")
        rows.append(Row(line, dis, ref, mos))
    if not rows:
        raise AfineError(f"{path}:1: no dis,ref,mos rows")
    return rows


def check_rows(path: str | Path, rows: list[Row]) -> None:
    """Names that stay unique in one images/ folder, one role per image, unique reference stems (MOS files are
    named by them), readable images and each distorted image the size of its reference."""
    seen: dict[str, tuple[Path, int, str]] = {}  # file name -> (path, first line, role)
    stems: dict[str, tuple[str, int]] = {}  # reference stem -> (file name, first line)
    sizes: dict[Path, tuple[int, int]] = {}
    for row in rows:
        where = f"{path}:{row.line}"
        for role, image in (("distorted", row.dis), ("reference", row.ref)):
            name = image.name
            if name in seen:
                first, line, first_role = seen[name]
                if first.resolve() != image.resolve():
                    raise AfineError(f"{where}: image name {name!r} ({image}) is also used by {first} (line {line}); "
                                     f"image names must be unique")
                if role != first_role:
                    raise AfineError(f"{where}: {name!r} is a {role} image here and a {first_role} image on "
                                     f"line {line}")
                if role == "distorted":
                    raise AfineError(f"{where}: distorted image {name!r} is listed twice (also on line {line})")
            else:
                seen[name] = (image, row.line, role)
            try:
                if image not in sizes:
                    sizes[image] = image_size(image)
            except AfineError as e:
                raise AfineError(f"{where}: {e}") from None
        stem = row.ref.stem
        if stem in stems and stems[stem][0] != row.ref.name:
            raise AfineError(f"{where}: references {row.ref.name!r} and {stems[stem][0]!r} (line {stems[stem][1]}) "
                             f"share the stem {stem!r}, which names their MOS file")
        stems.setdefault(stem, (row.ref.name, row.line))
        if sizes[row.dis] != sizes[row.ref]:
            (h, w), (rh, rw) = sizes[row.dis], sizes[row.ref]
            raise AfineError(f"{where}: distorted image {row.dis.name!r} is {w}x{h} but its reference "
                             f"{row.ref.name!r} is {rw}x{rh}")


def split_references(references: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """Reference names split 7:1:2 into (Train, Validation, Test) by a seeded permutation of their sorted names.

    Validation and Test get round(n / 10) and round(n / 5) references, at least one each; Train the rest.
    Needs n >= 3.
    """
    names = sorted(set(references))
    n = len(names)
    if n < 3:
        raise AfineError(f"{n} reference(s); a 7:1:2 split by reference needs at least 3")
    validation = max(1, math.floor(n / 10 + 0.5))
    test = max(1, math.floor(n / 5 + 0.5))
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    train = n - validation - test
    return order[:train], order[train:train + validation], order[train + validation:]


def place_image(source: Path, target: Path, mode: str) -> None:
    """Copy, symlink (to the absolute source path) or hard-link one image into the images folder."""
    try:
        if mode == "copy":
            shutil.copy2(source, target)
        elif mode == "symlink":
            os.symlink(source.resolve(), target)
        else:
            os.link(source, target)
    except OSError as e:
        raise AfineError(f"{source}: cannot {mode} it into the dataset's images folder ({reason(e)})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", help="CSV of dis,ref,mos rows (paths relative to the CSV's folder; MOS higher = better)")
    parser.add_argument("--out", required=True, help="new (or empty) dataset folder, e.g. data/MyIQA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 7:1:2 split and of the triplets (default 0)")
    parser.add_argument("--images", choices=list(IMAGE_MODES), default="copy",
                        help="how images get into <out>/images: copy (default), symlink or hardlink")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
