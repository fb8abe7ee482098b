"""Test images paired with references by file name, for `python -m afine score DIS_DIR REF_DIR`.

A test image pairs with the reference of the same file name, else with the one reference of the same stem
and any image suffix (`out/0001.jpg` with `hr/0001.png`). A reference image given instead of a folder pairs
with every test image. Only the top level of a folder is read; hidden files and files that are not images
(by suffix) are ignored. Images on either side without a partner are an error listing them, or, when the
caller allows it, skipped with a warning: never silently dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .datasets import IMAGE_SUFFIXES
from .errors import AfineError

LISTED = 10  # unpaired images named in one message; the rest are counted


def folder_images(folder: Path) -> list[Path]:
    """The images at the top level of a folder, sorted by name; error if there are none."""
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise AfineError(f"{folder}: no images in folder (suffixes {', '.join(IMAGE_SUFFIXES)})")
    return images


def pair_folder(dis_dir: Path, ref: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(pairs in test-image order, descriptions of the images left without a partner)."""
    images = folder_images(dis_dir)
    if ref.is_file():
        return [(d, ref) for d in images], []
    references = folder_images(ref)
    by_name = {r.name: r for r in references}
    by_stem: dict[str, list[Path]] = {}
    for r in references:
        by_stem.setdefault(r.stem, []).append(r)
    pairs, unpaired = [], []
    for d in images:
        candidates = [by_name[d.name]] if d.name in by_name else by_stem.get(d.stem, [])
        if len(candidates) == 1:
            pairs.append((d, candidates[0]))
        elif candidates:
            unpaired.append(f"{d} (several references: {', '.join(c.name for c in candidates)})")
        else:
            unpaired.append(f"{d} (no reference {d.stem}.* in {ref})")
    used = {r for _, r in pairs}
    unpaired += [f"{r} (no test image {r.stem}.* in {dis_dir})" for r in references if r not in used]
    return pairs, unpaired


def listing(items: list[str]) -> str:
    more = f", and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def image_pairs(dis: str | Path, ref: str | Path, skip_unpaired: bool = False) -> list[tuple[Path, Path]]:
    """The (dis, ref) pairs of the command line's DIS REF: two images, a folder and a reference image, or two
    folders paired by name. Unpaired images are an AfineError listing them, or with `skip_unpaired` a warning."""
    dis, ref = Path(dis), Path(ref)
    if not dis.is_dir():
        if ref.is_dir():
            raise AfineError(f"{ref}: a folder of references needs a folder of test images, but {dis} is not a "
                             f"folder (give DIS REF images, DIS_DIR REF_DIR, or DIS_DIR REF)")
        if skip_unpaired:
            raise AfineError("--skip-unpaired applies to folders (DIS_DIR REF_DIR)")
        return [(dis, ref)]
    if not ref.exists():
        raise AfineError(f"{ref}: reference folder or image not found")
    pairs, unpaired = pair_folder(dis, ref)
    if unpaired and not skip_unpaired:
        raise AfineError(f"{len(unpaired)} image(s) without a partner: {listing(unpaired)}; "
                         f"--skip-unpaired scores the others")
    if unpaired:
        print(f"warning: skipped {len(unpaired)} image(s) without a partner: {listing(unpaired)}", file=sys.stderr)
    if not pairs:
        raise AfineError(f"{dis}: no test image has a reference in {ref}")
    return pairs
