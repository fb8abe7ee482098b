"""Label files of the IQA datasets (docs/datasets.md): MOS lists, triplet lists, SRIQA scores.

Readers validate every line and raise AfineError("path:LINE: ...") on malformed input; writers
produce the distributed formats. Also here: the "nlogn" triplet generation from MOS lists, the
PIPAL MOS normalisation used by fit_gamma, TID2013's lower-casing preparation step, and a dataset's label
files from a CSV of dis,ref,mos rows (the rows read and checked by afine/csvdataset.py).

Labels g: 1 = first image better, 0 = second better, 0.5 = same. MOS: higher is better.

    python -m afine.labels nlogn --mos-dir D --out FILE --seed S
    python -m afine.labels lowercase-tid2013 ROOT
    python -m afine.labels pipal-mos --mos-dir D [--out FILE]
    python -m afine.labels from-csv scores.csv --out data/MyIQA [--seed S] [--images copy|symlink|hardlink]
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from .interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import csvdataset
from .atomic import TEXT, atomic_folder, check_writable, printout, write_text
from .errors import AfineError, ArgumentParser, command, printable, warn

LABELS = (0.0, 0.5, 1.0)
SPLITS = ("Train", "Validation", "Test")


@dataclass(frozen=True)
class MOSRecord:
    """One line of a MOS list: distorted image, its reference, mean opinion score (higher is better)."""

    dis: str
    ref: str
    mos: float
    var: float | None = None


@dataclass(frozen=True)
class Triplet:
    """Two images x1, x2 and the reference y; g12 compares x1 with x2, g1y / g2y compare each with y."""

    x1: str
    x2: str
    y: str
    g12: float
    g1y: float | None = None
    g2y: float | None = None


# ---------------------------------------------------------------------------------------------- reading


def _lines(path: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, stripped comma-separated fields) of every non-blank line; errors for missing/empty files."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AfineError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise AfineError(f"{path}: is a folder, expected a label file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AfineError(f"{path}: cannot read label file ({e})") from None
    rows = [(n, [f.strip() for f in line.split(",")]) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise AfineError(f"{path}:1: empty file, no records")
    return rows


_warned_duplicates: set[Path] = set()


def _warn_duplicates(path: Path, numbered: list[tuple[int, object]]) -> None:
    """Warn (once per file) when a label file repeats an identical entry: a repeated pair counts twice."""
    first: dict[object, int] = {}
    repeats = []
    for line, entry in numbered:
        if entry in first:
            repeats.append((first[entry], line))
        else:
            first[entry] = line
    if repeats and path not in _warned_duplicates:
        _warned_duplicates.add(path)
        n = len(repeats) - 1
        more = f" ({n} more repeat{'s' if n > 1 else ''})" if n else ""
        warn(f"{path}: lines {repeats[0][0]} and {repeats[0][1]} hold the same entry{more}")


def _number(path: Path, line: int, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AfineError(f"{path}:{line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise AfineError(f"{path}:{line}: {what} {text!r} is not finite")
    return value


def _label(path: Path, line: int, what: str, text: str) -> float:
    value = _number(path, line, what, text)
    if value not in LABELS:
        raise AfineError(f"{path}:{line}: {what} {text!r} is not a label (0, 0.5 or 1)")
    return value


def _name(path: Path, line: int, what: str, text: str) -> str:
    if not text:
        raise AfineError(f"{path}:{line}: empty {what} file name")
    return text


def read_mos_numbered(path: str | Path) -> list[tuple[int, MOSRecord]]:
    """Like read_mos, with each record's line number (for error messages further down the line)."""
    path = Path(path)
    records = []
    for line, fields in _lines(path):
        if len(fields) not in (3, 4):
            raise AfineError(f"{path}:{line}: expected 3 or 4 columns (dis,ref,mos[,var]), got {len(fields)}")
        dis = _name(path, line, "distorted", fields[0])
        ref = _name(path, line, "reference", fields[1])
        mos = _number(path, line, "MOS", fields[2])
        var = _number(path, line, "variance", fields[3]) if len(fields) == 4 else None
        records.append((line, MOSRecord(dis, ref, mos, var)))
    _warn_duplicates(path, records)
    return records


def read_mos(path: str | Path) -> list[MOSRecord]:
    """Read a MOS list: 'dis,ref,mos' lines (PIPAL, TID2013) or 'dis,ref,mos,var' lines (KADID-10k)."""
    return [r for _, r in read_mos_numbered(path)]


def mos_files(folder: str | Path) -> list[Path]:
    """The *.txt MOS lists of a MOS/ folder in sorted file-name order (none if the folder is missing)."""
    return sorted(Path(folder).glob("*.txt"))


def read_mos_folder_numbered(folder: str | Path) -> list[tuple[Path, int, MOSRecord]]:
    """Like read_mos_folder, with each record's file and line number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AfineError(f"{folder}: MOS folder not found")
    files = mos_files(folder)
    if not files:
        raise AfineError(f"{folder}: no *.txt MOS files in folder")
    return [(f, line, record) for f in files for line, record in read_mos_numbered(f)]


def read_mos_folder(folder: str | Path) -> list[MOSRecord]:
    """Every *.txt MOS list of a MOS/ folder, concatenated in sorted file-name order."""
    return [record for _, _, record in read_mos_folder_numbered(folder)]


def read_triplets_numbered(path: str | Path) -> list[tuple[int, Triplet]]:
    """Like read_triplets, with each triplet's line number (for error messages further down the line)."""
    path = Path(path)
    triplets = []
    for line, fields in _lines(path):
        if len(fields) not in (4, 6):
            raise AfineError(f"{path}:{line}: expected 6 columns (x1,x2,y,g12,g1y,g2y) or 4 (x1,x2,y,g12), "
                             f"got {len(fields)}")
        x1, x2, y = (_name(path, line, what, f) for what, f in zip(("x1", "x2", "y"), fields[:3]))
        g = [_label(path, line, what, f) for what, f in zip(("g12", "g1y", "g2y"), fields[3:])]
        triplets.append((line, Triplet(x1, x2, y, *g)))
    _warn_duplicates(path, triplets)
    return triplets


def read_triplets(path: str | Path) -> list[Triplet]:
    """Read a triplet list: 'x1,x2,y,g12,g1y,g2y' lines or 4-column 'x1,x2,y,g12' lines (DiffIQA per type)."""
    return [t for _, t in read_triplets_numbered(path)]


def read_sriqa_mos(path: str | Path) -> list[tuple[str, float]]:
    """Read an SRIQA-Bench MOS file: 'name,score' or 'name score' lines (0..100, higher is better)."""
    path = Path(path)
    scores, numbers = [], []
    for line, fields in _lines(path):
        if len(fields) == 1:  # no comma: whitespace-separated
            fields = fields[0].split()
        if len(fields) != 2:
            raise AfineError(f"{path}:{line}: expected 'name,score' or 'name score', got {len(fields)} fields")
        scores.append((_name(path, line, "image", fields[0]), _number(path, line, "score", fields[1])))
        numbers.append(line)
    _warn_duplicates(path, list(zip(numbers, scores)))
    return scores


# ---------------------------------------------------------------------------------------------- writing


def _fmt(value: float) -> str:
    """Shortest text that reads back to the same float; labels print as 0, 0.5, 1."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def write_mos(path: str | Path, records: list[MOSRecord]) -> None:
    """Write a MOS list; records with a variance get the 4-column KADID-10k form."""
    lines = []
    for r in records:
        fields = [r.dis, r.ref, _fmt(r.mos)] + ([] if r.var is None else [_fmt(r.var)])
        lines.append(",".join(fields))
    write_text(path, "".join(line + "\n" for line in lines))


def write_triplets(path: str | Path, triplets: list[Triplet]) -> None:
    """Write a triplet list: 6 columns, or 4 columns for triplets whose g1y is None."""
    lines = []
    for t in triplets:
        if (t.g1y is None) != (t.g2y is None):
            raise AfineError(f"{path}: triplet ({t.x1}, {t.x2}, {t.y}) has only one of g1y, g2y")
        labels = [t.g12] if t.g1y is None else [t.g12, t.g1y, t.g2y]
        for g in labels:
            if g not in LABELS:
                raise AfineError(f"{path}: triplet ({t.x1}, {t.x2}, {t.y}) has label {g!r}, not 0, 0.5 or 1")
        lines.append(",".join([t.x1, t.x2, t.y] + [_fmt(g) for g in labels]))
    write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------- label tools


def compare(a: float, b: float) -> float:
    """Label for 'a better than b' given higher-is-better scores: 1, 0, or 0.5 when equal."""
    return 1.0 if a > b else 0.0 if a < b else 0.5


def nlogn_triplets(records: list[MOSRecord], seed: int) -> list[Triplet]:
    """The traditional datasets' "nlogn" triplets: per reference group, each image paired with round(log2 n) others.

    A group holds the reference's distorted images plus the reference itself (n images; the reference
    is better than all). Each image is x1 of exactly k = round(log2 n) triplets and x2 of exactly k, with
    k distinct partners; y is always the group's reference. Construction: a seeded random cycle over the
    group's images and k distinct random offsets d; image at position p is paired with position p + d.
    With offsets in 1..(n-1)//2 no unordered pair repeats; groups too small for that (n <= 4 or n == 6)
    use offsets 1..min(k, n-1), so some pairs appear in both orders. Output does not depend on the
    order of `records` (groups and images are sorted by name first).
    """
    groups: dict[str, dict[str, float]] = {}
    for r in records:
        if r.dis == r.ref:
            raise AfineError(f"MOS record for {r.dis!r} names itself as its reference")
        group = groups.setdefault(r.ref, {})
        if r.dis in group:
            raise AfineError(f"distorted image {r.dis!r} appears twice in the MOS lists of reference {r.ref!r}")
        group[r.dis] = r.mos
    rng = np.random.default_rng(seed)
    triplets = []
    for ref in sorted(groups):
        names = sorted(groups[ref]) + [ref]
        mos = [groups[ref][d] for d in names[:-1]] + [math.inf]  # the reference beats every distorted image
        n = len(names)
        k = min(math.floor(math.log2(n) + 0.5), n - 1)
        if k == 0:
            continue
        unique_max = (n - 1) // 2
        offsets = rng.choice(np.arange(1, unique_max + 1), size=k, replace=False) if k <= unique_max \
            else np.arange(1, k + 1)
        order = rng.permutation(n)
        for p in range(n):
            i = order[p]
            for d in offsets:
                j = order[(p + d) % n]
                g1y = 0.5 if names[i] == ref else 0.0
                g2y = 0.5 if names[j] == ref else 0.0
                triplets.append(Triplet(names[i], names[j], ref, compare(mos[i], mos[j]), g1y, g2y))
    return triplets


def normalise_pipal_mos(mos: np.ndarray) -> np.ndarray:
    """fit_gamma's target: PIPAL MOS to [-2, 2] with the sign flipped (best -> -2): -((m - min)/(max - min)*4 - 2)."""
    m = np.asarray(mos, dtype=np.float64)
    if m.size == 0:
        raise AfineError("no MOS values to normalise")
    lo, hi = m.min(), m.max()
    if not hi > lo:
        raise AfineError(f"all MOS values are equal ({lo}); cannot normalise to [-2, 2]")
    return -((m - lo) / (hi - lo) * 4.0 - 2.0)


def _rename_lower(path: Path) -> bool:
    """Rename one file to its lower-case name (via a temp name, so case-insensitive file systems work too)."""
    target = path.with_name(path.name.lower())
    if target.name == path.name:
        return False
    if target.exists() and not target.samefile(path):
        raise AfineError(f"{path}: cannot lower-case the name, {target} already exists")
    tmp = path.with_name(f".{path.name}.lowercase.tmp")
    path.rename(tmp)
    tmp.rename(target)
    return True


def lowercase_tid2013(root: str | Path) -> dict[str, int]:
    """Lower-case TID2013's file names as the official preparation does.

    Renames every file under `root/images` to its lower-case name, lower-cases the image names inside
    the label files `root/<split>/MOS/*.txt` and `root/<split>/Triplet/*.txt`, and renames the MOS files
    (named by reference stem) to lower case; `Triplet/Triplet.txt` keeps its name.
    Idempotent. Returns counts: images_renamed, label_files_renamed, label_files_rewritten.
    """
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise AfineError(f"{images}: TID2013 images folder not found")
    counts = {"images_renamed": 0, "label_files_renamed": 0, "label_files_rewritten": 0}
    for path in sorted(p for p in images.rglob("*") if p.is_file()):
        counts["images_renamed"] += _rename_lower(path)
    label_files = sorted(p for split in SPLITS for sub in ("MOS", "Triplet")
                         for p in (root / split / sub).glob("*.txt"))
    for path in label_files:
        text = path.read_text(encoding="utf-8-sig")
        if text != text.lower():
            write_text(path, text.lower())
            counts["label_files_rewritten"] += 1
        if path.parent.name == "MOS":
            counts["label_files_renamed"] += _rename_lower(path)
    return counts


def dataset_from_csv(csv_path: str | Path, out: str | Path, seed: int = 0, images: str = "copy",
                     progress: bool = True) -> dict[str, dict[str, int]]:
    """A dataset in the traditional layout from a CSV of dis,ref,mos rows (afine/csvdataset.py): every row checked
    first, then the folder built beside `out` and renamed to it when complete, so a failure leaves `out` as it
    was. Returns per split the counts of references, distorted images and triplets."""
    if images not in csvdataset.IMAGE_MODES:
        raise AfineError(f"--images {images!r}: expected one of {', '.join(csvdataset.IMAGE_MODES)}")
    csv_path, out = Path(csv_path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AfineError(f"{out}: exists and is not an empty folder; choose a new output folder")
    rows = csvdataset.read_rows(csv_path)
    csvdataset.check_rows(csv_path, rows)
    try:
        splits = dict(zip(SPLITS, csvdataset.split_references([r.ref.name for r in rows], seed)))
    except AfineError as e:
        raise AfineError(f"{csv_path}: {e}") from None
    groups: dict[str, list[MOSRecord]] = {}
    for r in rows:
        groups.setdefault(r.ref.name, []).append(MOSRecord(r.dis.name, r.ref.name, r.mos))
    sources = list(dict.fromkeys(p for r in rows for p in (r.ref, r.dis)))
    counts = {}
    with atomic_folder(out) as folder:
        (folder / "images").mkdir()
        for source in tqdm(sources, desc=images, unit="img", file=sys.stderr, disable=not progress, leave=False):
            csvdataset.place_image(source, folder / "images" / source.name, images)
        for split, references in splits.items():
            for ref in references:
                write_mos(folder / split / "MOS" / f"{Path(ref).stem}.txt", groups[ref])
            flat = [record for ref in references for record in groups[ref]]
            triplets = nlogn_triplets(flat, seed)
            write_triplets(folder / split / "Triplet" / "Triplet.txt", triplets)
            counts[split] = {"references": len(references), "distorted": len(flat), "triplets": len(triplets)}
    return counts


# ---------------------------------------------------------------------------------------------- CLI


def _cmd_nlogn(args: argparse.Namespace) -> None:
    check_writable(args.out, mos_files(args.mos_dir), TEXT)
    records = read_mos_folder(args.mos_dir)
    triplets = nlogn_triplets(records, args.seed)
    write_triplets(args.out, triplets)
    groups = len({r.ref for r in records})
    print(f"wrote {len(triplets)} triplets from {len(records)} MOS records in {groups} groups to "
          f"{printable(args.out)}", file=printout(args.out))


def _cmd_lowercase(args: argparse.Namespace) -> None:
    counts = lowercase_tid2013(args.root)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


def _cmd_pipal_mos(args: argparse.Namespace) -> None:
    if args.out:
        check_writable(args.out, mos_files(args.mos_dir), TEXT)
    records = read_mos_folder(args.mos_dir)
    y = normalise_pipal_mos(np.array([r.mos for r in records]))
    normalised = [MOSRecord(r.dis, r.ref, float(v)) for r, v in zip(records, y)]
    if args.out:
        write_mos(args.out, normalised)
        print(f"wrote {len(normalised)} normalised MOS records to {printable(args.out)}", file=printout(args.out))
    else:
        sys.stdout.write("".join(f"{r.dis},{r.ref},{_fmt(r.mos)}\n" for r in normalised))


def _cmd_from_csv(args: argparse.Namespace) -> None:
    counts = dataset_from_csv(args.csv, args.out, args.seed, args.images, progress=not args.no_progress)
    out = Path(args.out)
    summary = ", ".join(f"{split} {c['references']} references / {c['distorted']} images / {c['triplets']} triplets"
                        for split, c in counts.items())
    print(f"wrote {printable(out)} (images {csvdataset.IMAGE_MODES[args.images]}): {summary}")
    print(f"use it as dataset {printable(out.name)!r} with data root {printable(out.parent)}")


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m afine.labels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("nlogn", help="generate nlogn triplets from a MOS/ folder")
    p.add_argument("--mos-dir", required=True, help="folder of MOS *.txt lists")
    p.add_argument("--out", required=True, help="triplet list to write (*.txt; '-': standard output)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_nlogn)
    p = sub.add_parser("lowercase-tid2013", help="lower-case TID2013 image and label file names in place")
    p.add_argument("root", help="the TID2013 dataset folder")
    p.set_defaults(func=_cmd_lowercase)
    p = sub.add_parser("pipal-mos", help="PIPAL MOS normalised to [-2, 2], best -> -2 (fit_gamma's target)")
    p.add_argument("--mos-dir", required=True, help="folder of MOS *.txt lists")
    p.add_argument("--out", help="MOS list to write (*.txt; default: print dis,ref,mos lines)")
    p.set_defaults(func=_cmd_pipal_mos)
    p = sub.add_parser("from-csv", help="make a dataset in the traditional layout from a CSV of dis,ref,mos rows")
    csvdataset.add_arguments(p)
    p.set_defaults(func=_cmd_from_csv)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
