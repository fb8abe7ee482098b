"""Test images paired with references by file name, for `python -m afine score DIS_DIR REF_DIR`.

A test image pairs with the reference of the same file name, else with the one reference of the same stem
and any image suffix (`out/0001.jpg` with `hr/0001.png`). A reference image given instead of a folder pairs
with every test image. Only the top level of a folder is read; hidden files and files that are not images
(by suffix) are ignored. Images on either side without a partner are an error listing them, or, when the
caller allows it, skipped with a warning: never silently dropped. So are broken symbolic links: an error
like any unreadable image, or skipped and listed in the warning.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import reason
from .datasets import IMAGE_SUFFIXES
from .errors import AfineError, warn

LISTED = 10  # unpaired images named in one message; the rest are counted


def broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def broken_description(dis: Path, ref: Path) -> str:
    if broken_link(dis):
        return f"broken symbolic link to {os.readlink(dis)}"
    return f"its reference {ref} is a broken symbolic link to {os.readlink(ref)}"


def folder_images(folder: Path) -> list[Path]:
    """The images at the top level of a folder (broken symbolic links included), sorted by name; error if the
    folder cannot be read or holds none."""
    try:
        images = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                        and p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or broken_link(p)))
    except OSError as e:
        raise AfineError(f"{folder}: cannot read folder ({reason(e)})") from None
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
    pairs, unpaired, claimed = [], [], set()
    for d in images:
        candidates = [by_name[d.name]] if d.name in by_name else by_stem.get(d.stem, [])
        if len(candidates) == 1:
            pairs.append((d, candidates[0]))
        elif candidates:
            unpaired.append(f"{d} (several references: {', '.join(c.name for c in candidates)})")
            claimed.update(candidates)  # named in that entry: not also a reference "with no test image"
        else:
            unpaired.append(f"{d} (no reference {d.stem}.* in {ref})")
    used = {r for _, r in pairs} | claimed
    unpaired += [f"{r} (no test image {r.stem}.* in {dis_dir})" for r in references if r not in used]
    return pairs, unpaired


def listing(items: list[str]) -> str:
    more = f", and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def image_pairs(dis: str | Path, ref: str | Path, skip_unpaired: bool = False) -> list[tuple[Path, Path]]:
    """The (dis, ref) pairs of the command line's DIS REF: two images, a folder and a reference image, or two
    folders paired by name. Unpaired images are an AfineError listing them, or with `skip_unpaired` a warning;
    so are pairs holding a broken symbolic link, which otherwise fail later as an image file not found."""
    dis, ref = Path(dis), Path(ref)
    try:  # a folder above them that may not be searched makes even these fail
        dis_is_folder, ref_is_folder, ref_exists = dis.is_dir(), ref.is_dir(), ref.exists()
    except OSError as e:
        raise AfineError(f"{e.filename}: cannot read ({reason(e)})") from None
    if not dis_is_folder:
        if ref_is_folder:
            raise AfineError(f"{ref}: a folder of references needs a folder of test images, but {dis} is not a "
                             f"folder (give DIS REF images, DIS_DIR REF_DIR, or DIS_DIR REF)")
        if skip_unpaired:
            raise AfineError("--skip-unpaired applies to folders (DIS_DIR REF_DIR)")
        return [(dis, ref)]
    if not ref_exists:
        raise AfineError(f"{ref}: reference folder or image not found")
    pairs, unpaired = pair_folder(dis, ref)
    if unpaired and not skip_unpaired:
        raise AfineError(f"{len(unpaired)} image(s) without a partner: {listing(unpaired)}; "
                         f"--skip-unpaired scores the others")
    if skip_unpaired:
        skipped = [f"{d} ({broken_description(d, r)})" for d, r in pairs if broken_link(d) or broken_link(r)]
        pairs = [(d, r) for d, r in pairs if not (broken_link(d) or broken_link(r))]
        if skipped + unpaired:
            warn(f"skipped {len(skipped + unpaired)} image(s): {listing(skipped + unpaired)}")
    if not pairs:
        raise AfineError(f"{dis}: no test image has a reference in {ref}")
    return pairs
