"""`afine compare REF METHOD [METHOD ...]`: several methods' result folders against one folder of references, in
one run: the table of a paper, the statistics that say which differences are real, and a visual report.

    afine compare HR/ results/EDSR results/SwinIR Real-ESRGAN=results/realesrgan_x4
    afine compare HR/ results/* --format latex --json compare.json --csv compare.csv --html report/
    torchrun --nproc_per_node=4 -m afine compare HR/ results/* --html report/

Each METHOD folder is paired with REF by file name exactly as `afine score` pairs folders (afine/folders.py).
When REF holds only subfolders (HR/Set5/, HR/Urban100/, ...), each is a test set and every METHOD holds the same
subfolders. Each reference is decoded and encoded once for all methods, in the batch of their outputs: N methods
cost N + 1 CLIP passes per reference. Under torchrun the batches are shared out as `afine score` shares them and
rank 0 writes what one process would. The statistics are in afine/compare_stats.py, the report in afine/report.py;
docs/compare.md is the manual.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import compare_stats, distributed, provenance, report, score
from .atomic import check_not_input, check_writable, reason, write_json, write_text
from .errors import AfineError, printable, warn
from .folders import broken_description, broken_link, folder_images, listing, pair_folder
from .model import TERMS

DESCRIPTION = ("Compare methods: score every METHOD folder against the references in REF (paired by file name, as "
               "`afine score` pairs folders; when REF holds only subfolders, each is a test set that every METHOD "
               "must hold too), then print a summary table (mean, 95% bootstrap interval, mean of every term, "
               "rank; lower is better), and write per-image JSON and CSV files and a visual HTML report if asked "
               "(docs/compare.md).")
FORMATS = ("markdown", "latex", "csv")
DIGITS = 4  # decimals of the printed tables (the JSON and CSV files hold every digit)


@dataclass
class Method:
    name: str
    folder: Path


@dataclass
class TestSet:
    """The references every method has an output for, and each method's outputs for them (same order)."""

    name: str
    folder: Path
    references: list[Path]
    outputs: list[list[Path]]  # [method][image]
    left_out: list[int]  # per method: its images in the set that are not compared
    references_left_out: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", metavar="REF",
                        help="folder of reference images, or of test sets (subfolders) of reference images")
    parser.add_argument("methods", nargs="+", metavar="METHOD",
                        help="a method's folder of results (named by the folder's name), or NAME=FOLDER")
    parser.add_argument("--term", choices=TERMS, default="afine_all_scale",
                        help="the term the methods are compared by (default afine_all_scale; lower is better for "
                             "every term)")
    parser.add_argument("--skip-unpaired", action="store_true",
                        help="compare every method on the images (and sets) that all of them have, counting the "
                             "others as left out, instead of failing")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="resamples of the images for the 95%% interval of each mean (default 2000, fixed seed; "
                             "0: no intervals)")
    parser.add_argument("--format", choices=FORMATS, default="markdown",
                        help="the summary table on stdout (default markdown)")
    parser.add_argument("--json", metavar="FILE", help="write everything, every image's terms too, to this JSON file")
    parser.add_argument("--csv", metavar="FILE", help="write one row per (set, method, image) with every term")
    parser.add_argument("--html", metavar="DIR", help="write a visual report (index.html and thumbnails) to this "
                        "new folder, or over an earlier report")
    score.add_model_arguments(parser)


def parse_method(spec: str) -> Method:
    """FOLDER (named by its name) or NAME=FOLDER. An existing folder is a FOLDER even if its path holds '='; else
    NAME ends at the first '=' after which a folder follows (a name may hold '=' too)."""
    if os.path.isdir(spec) or "=" not in spec:
        path = Path(spec)
        return Method(path.name or path.resolve().name, path)
    cuts = [i for i, c in enumerate(spec) if c == "="]
    i = next((i for i in cuts if os.path.isdir(spec[i + 1:])), cuts[0])
    if i == 0 or i == len(spec) - 1:
        raise AfineError(f"{spec}: expected a folder or NAME=FOLDER")
    return Method(spec[:i], Path(spec[i + 1:]))


def parse_methods(specs: list[str]) -> list[Method]:
    """The methods of the command line. Folders of the same name (EDSR/Set5, SRCNN/Set5) are named by as many of
    their last path components as tell them apart (EDSR/Set5, SRCNN/Set5)."""
    methods = [parse_method(spec) for spec in specs]
    named = [("=" in spec and not os.path.isdir(spec)) for spec in specs]
    for depth in range(2, 64):
        clash = [m for m, given in zip(methods, named)
                 if not given and sum(o.name == m.name for o in methods) > 1]
        if not clash:
            break
        for m in clash:
            parts = m.folder.absolute().parts
            m.name = "/".join(parts[-depth:]) if m.folder.name else m.name
    return methods


def subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as e:
        raise AfineError(f"{folder}: cannot read folder ({reason(e)})") from None


def test_sets(reference: Path) -> tuple[list[tuple[str, Path]], bool]:
    """The test sets (name, reference folder) and whether REF is the several-sets layout: REF holds no image but
    subfolders."""
    if not reference.is_dir():
        raise AfineError(f"{reference}: not a folder of reference images")
    folders = subfolders(reference)
    if folders and not images_in(reference):
        return [(f.name, f) for f in folders], True
    return [(reference.name or reference.resolve().name, reference)], False


def images_in(folder: Path) -> list[Path]:
    """The images at the top level of a folder, as afine score reads them (none: an empty list, not an error)."""
    try:
        next(folder.iterdir(), None)
    except OSError as e:
        raise AfineError(f"{folder}: cannot read folder ({reason(e)})") from None
    try:
        return folder_images(folder)
    except AfineError:  # the folder can be read: it holds no image
        return []


def pair_set(name: str, folder: Path, methods: list[Method], multi: bool) -> tuple[TestSet, list[str]]:
    """Every method's outputs for the references of one set, and what is missing: the test set keeps the
    references that every method has exactly one readable output for."""
    references = folder_images(folder)
    found, counts, missing = [], [], []
    for method in methods:
        outputs = method.folder / name if multi else method.folder
        images = images_in(outputs) if outputs.is_dir() else []
        counts.append(len(images))
        if not images:
            what = "missing" if not outputs.is_dir() else "without images"
            missing.append(f"{outputs} (set {name} {what} for method {method.name})")
            found.append({})
            continue
        pairs, unpaired = pair_folder(outputs, folder)  # the pairing of `afine score DIS_DIR REF_DIR`
        by_reference: dict[Path, list[Path]] = {}
        for d, r in pairs:
            by_reference.setdefault(r, []).append(d)
        mine = {}
        for r, ds in by_reference.items():
            if len(ds) > 1:
                unpaired.append(f"{r} (several outputs in {outputs}: {', '.join(d.name for d in ds)})")
            elif broken_link(ds[0]) or broken_link(r):
                unpaired.append(f"{ds[0]} ({broken_description(ds[0], r)})")
            else:
                mine[r] = ds[0]
        found.append(mine)
        missing += unpaired
    common = [r for r in references if all(r in mine for mine in found)]
    return TestSet(name, folder, common, [[mine[r] for r in common] for mine in found],
                   [c - len(common) for c in counts], len(references) - len(common)), missing


def find_layout(reference: Path, methods: list[Method], skip_unpaired: bool) -> tuple[list[TestSet], bool]:
    """The test sets to compare; what a method lacks is one AfineError listing it, or with `skip_unpaired` a
    warning (the set keeps the images every method has)."""
    for method in methods:
        if not method.folder.is_dir():
            raise AfineError(f"{method.folder}: method {method.name}: not a folder of results")
    names = [m.name for m in methods]
    for method in methods:
        if names.count(method.name) > 1:
            same = [str(m.folder) for m in methods if m.name == method.name]
            raise AfineError(f"two methods are named {method.name} ({', '.join(same)}); name them NAME=FOLDER")
    found, multi = test_sets(reference)
    sets, missing = [], []
    for name, folder in found:
        test_set, lacking = pair_set(name, folder, methods, multi)
        sets.append(test_set)
        missing += lacking
    if multi:
        known = {name for name, _ in found}
        extra = [str(f) for m in methods for f in subfolders(m.folder) if f.name not in known]
        if extra:
            warn(f"not compared, no such test set in {reference}: {listing(extra)}")
    if missing and not skip_unpaired:
        raise AfineError(f"{len(missing)} image(s) or set(s) missing: {listing(missing)}; --skip-unpaired compares "
                         f"the images every method has")
    if missing:
        warn(f"skipped {len(missing)} image(s) or set(s): {listing(missing)}")
    empty = [s.name for s in sets if not s.references]
    if empty:
        warn(f"no image has an output from every method in set(s) {', '.join(empty)}: not compared")
        sets = [s for s in sets if s.references]
    if not sets:
        raise AfineError(f"{reference}: no reference has an output from every method")
    return sets, multi


def all_pairs(sets: list[TestSet]) -> list[tuple[Path, Path]]:
    """(output, reference) of every set, method and image, in that order."""
    return [(out, ref) for s in sets for outputs in s.outputs for out, ref in zip(outputs, s.references)]


def plan_references(pairs: list[tuple[Path, Path]], sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Pair indices in batches of one image size that hold whole references: every output of a reference in the
    same batch, so the reference is decoded and encoded once; as many references as fit in `batch_size` pairs, and
    at least one."""
    groups: dict[Path, list[int]] = {}
    for i, (_, ref) in enumerate(pairs):
        groups.setdefault(ref, []).append(i)
    order = sorted(groups, key=lambda ref: (sizes[groups[ref][0]], str(ref)))
    batches, current = [], []
    for ref in order:
        group = groups[ref]
        if current and (len(current) + len(group) > batch_size or sizes[current[0]] != sizes[group[0]]):
            batches.append(current)
            current = []
        current += group
    return batches + [current] if current else batches


def check_outputs(args: argparse.Namespace, inputs: list[Path], folders: list[Path]) -> None:
    """Every output writable and none of them an input, before any work."""
    files = [f for f in (args.json, args.csv) if f]
    if len(files) == 2 and os.path.abspath(args.json) == os.path.abspath(args.csv):
        raise AfineError(f"{args.json}: --json and --csv name the same file")
    if files:
        check_not_input(files, inputs)  # the inputs (every image) looked at once for all the outputs
        for f in files:
            check_writable(f)
    if args.html:
        report.check_folder(Path(args.html), folders, inputs)


def prepare(args: argparse.Namespace, device: torch.device):
    """The test sets, their pairs and image sizes (every header checked), and the model on `device`."""
    if args.bootstrap < 0:
        raise AfineError(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    score.check_numbers(args)
    methods = parse_methods(args.methods)
    reference = Path(args.reference)
    sets, multi = find_layout(reference, methods, args.skip_unpaired)
    pairs = all_pairs(sets)
    check_outputs(args, [p for pair in pairs for p in pair] + score.model_files(args),
                  [reference] + [m.folder for m in methods])
    sizes = score.check_pairs(pairs)  # a bad image fails before the model is loaded (or downloaded)
    return methods, sets, multi, pairs, sizes, score.load_model(args, device)


def run(args: argparse.Namespace) -> int:
    """Compare, print and write; under torchrun only rank 0 prints and writes (afine.score.run_ranks)."""

    def work(d: distributed.Dist):
        methods, sets, multi, pairs, sizes, model = distributed.agree(d, prepare, args, d.device)
        workers = score.default_workers(d.device) if args.workers is None else args.workers
        scores, unscored = score.score_planned(model, pairs, sizes, plan_references(pairs, sizes, args.batch_size),
                                               d.device, not args.no_progress, args.precision, workers, unit="image")
        if unscored:  # every method's mean must be over the same images: an image changed mid-run stops the run
            raise AfineError(f"{len(unscored)} image(s) not scored: {listing(list(unscored.values()))}")
        results = [scores[i] for i in range(len(pairs))]
        score.check_finite(pairs, results)
        k = float(F.softplus(model.adapter.k.detach().double()))
        return methods, sets, multi, results, k, d.device

    return score.run_ranks(args.device, work, lambda done: write_outputs(args, *done))


def write_outputs(args: argparse.Namespace, methods: list[Method], sets: list[TestSet], multi: bool,
                  results: list[dict[str, float]], k: float, device: torch.device) -> None:
    """The table on stdout, then the report, the JSON and the CSV files asked for."""
    weights = [p for p in score.model_files(args) if p.is_file() and (not args.clip or p != Path(args.clip))]
    facts = {**provenance.facts(weights, Path(args.clip) if args.clip else None, device), "term": args.term,
             "precision": args.precision}
    summary = summarise(methods, sets, multi, results, k, args.term, args.bootstrap, facts, args.reference)
    print(format_table(summary, args.format), end="")
    if args.html:
        report.write(Path(args.html), summary, sets, progress=not args.no_progress)
    if args.json:
        write_json(args.json, summary)
    if args.csv:
        write_csv(args.csv, summary)


# ---------------------------------------------------------------------------------------------- statistics


def summarise(methods: list[Method], sets: list[TestSet], multi: bool, results: list[dict[str, float]], k: float,
              term: str, resamples: int, facts: dict, reference: str | Path = "") -> dict:
    """Everything the outputs show, as JSON-ready values: per set and method the mean, interval, term means,
    rank and how often the output was judged more natural than its reference; pairwise preferences and tests;
    every image's terms with lambda; the mean rank over sets."""
    summary = {"produced_by": facts, "term": term, "lower_is_better": True, "layout": "sets" if multi else "one set",
               "bootstrap": {"resamples": resamples, "seed": 0, "level": 0.95}, "reference": printable(reference),
               "methods": [{"name": printable(m.name), "folder": printable(m.folder)} for m in methods], "sets": []}
    start = 0
    all_ranks = []
    for s in sets:
        n, m = len(s.references), len(methods)
        values = np.array([[[r[t] for t in TERMS] for r in results[start + j * n:start + (j + 1) * n]]
                           for j in range(m)])  # [method, image, term]
        start += n * m
        nr, nr_ref = values[..., TERMS.index("afine_nr")], values[..., TERMS.index("afine_nr_ref")]
        lam = np.exp(k * (nr_ref - nr))
        natural = nr < nr_ref
        chosen = values[..., TERMS.index(term)]  # [method, image]
        means = chosen.mean(axis=1)
        ranks = compare_stats.ranks(list(means))
        all_ranks.append(ranks)
        indices = compare_stats.resample_indices(n, resamples) if resamples else None
        rows = []
        for j, method in enumerate(methods):
            rows.append({"name": printable(method.name), "mean": float(means[j]),
                         "interval": compare_stats.interval(chosen[j], indices) if resamples else None,
                         "terms": {t: float(values[j, :, i].mean()) for i, t in enumerate(TERMS)},
                         "rank": ranks[j], "more_natural": int(natural[j].sum()), "left_out": s.left_out[j]})
        pairs = [{"a": printable(methods[a].name), "b": printable(methods[b].name),
                  **compare_stats.pairwise(chosen[a], chosen[b])} for a in range(m) for b in range(a + 1, m)]
        images = [{"image": printable(ref.name), "reference": printable(ref),
                   "scores": [{"method": printable(method.name), "file": printable(s.outputs[j][i]),
                               **{t: float(values[j, i, ti]) for ti, t in enumerate(TERMS)}, "lambda": float(lam[j, i]),
                               "more_natural": bool(natural[j, i])} for j, method in enumerate(methods)]}
                  for i, ref in enumerate(s.references)]
        summary["sets"].append({"name": printable(s.name), "reference": printable(s.folder), "images": n,
                                "references_left_out": s.references_left_out, "methods": rows, "pairwise": pairs,
                                "per_image": images})
    mean_ranks = np.mean(all_ranks, axis=0)
    for row, r in zip(summary["methods"], mean_ranks):
        row["mean_rank"] = float(r)
    return summary


# ---------------------------------------------------------------------------------------------- outputs


def provenance_text(summary: dict) -> str:
    facts = summary["produced_by"]
    weights = "; ".join(f"{w['file']} (SHA-256 {w['sha256']})" for w in facts["weights"])
    clip = f"; CLIP {facts['clip']['file']} (SHA-256 {facts['clip']['sha256']})" if facts["clip"] else ""
    return (f"afine {facts['afine']}, weights {weights}{clip}, precision {facts['precision']}, device "
            f"{facts['device']}, torch {facts['torch']}")


def caption(summary: dict) -> str:
    b = summary["bootstrap"]["resamples"]
    interval = f", 95% bootstrap interval of the mean ({b} resamples of the images)" if b else ""
    return f"A-FINE {summary['term']}, lower is better: mean over each set's images{interval}; rank 1 is the best"


def set_heading(s: dict) -> str:
    left = [f"{row['name']} {row['left_out']}" for row in s["methods"] if row["left_out"]]
    more = f"; left out: {', '.join(left)}" if left else ""
    more += f"; references without every output: {s['references_left_out']}" if s["references_left_out"] else ""
    return f"{s['name']}: {s['images']} images{more}"


def number(value: float | None) -> str:
    return "" if value is None else f"{value:.{DIGITS}f}"


def set_rows(summary: dict, s: dict) -> tuple[list[str], list[list[str]], list[bool]]:
    """One set's summary table: header, cells, and which rows hold the best mean."""
    term = summary["term"]
    others = [t for t in TERMS if t != term]
    header = ["rank", "method", term, "95% interval", *others, "more natural than the reference"]
    best = min(row["rank"] for row in s["methods"])
    cells, bests = [], []
    for row in s["methods"]:
        low_high = f"[{number(row['interval'][0])}, {number(row['interval'][1])}]" if row["interval"] else ""
        cells.append([f"{row['rank']:g}", row["name"], number(row["mean"]), low_high,
                      *(number(row["terms"][t]) for t in others), f"{row['more_natural']} of {s['images']}"])
        bests.append(row["rank"] == best)
    return header, cells, bests


def overall_rows(summary: dict) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Methods against sets: each set's mean and rank, and the mean rank over the sets."""
    header = ["method", *(s["name"] for s in summary["sets"]), "mean rank"]
    cells, bests = [], []
    for j, method in enumerate(summary["methods"]):
        rows = [s["methods"][j] for s in summary["sets"]]
        cells.append([method["name"], *(f"{number(r['mean'])} ({r['rank']:g})" for r in rows),
                      f"{method['mean_rank']:.2f}"])
        bests.append([False] + [r["rank"] == min(o["rank"] for o in s["methods"]) for r, s in
                                zip(rows, summary["sets"])] + [False])
    return header, cells, bests


def one_line(text: str) -> str:
    """A name with line breaks (a file system allows them) kept on one line of a table or comment."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def markdown_cell(text: str) -> str:
    """Text shown as itself in a Markdown table: the characters that mark up escaped (an underscore inside a word
    marks up nothing and is left alone)."""
    text = re.sub(r"([\\|*<>`])", r"\\\1", one_line(text))
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", text)


def markdown_table(header: list[str], cells: list[list[str]], bold: list[list[bool]], align: list[str]) -> str:
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    for row, marks in zip(cells, bold):
        lines.append("| " + " | ".join(f"**{markdown_cell(c)}**" if b and c else markdown_cell(c)
                                       for c, b in zip(row, marks)) + " |")
    return "\n".join(lines)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_cell(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in one_line(text))


def latex_table(header: list[str], cells: list[list[str]], bold: list[list[bool]], columns: str) -> str:
    lines = [rf"\begin{{tabular}}{{{columns}}}", r"\toprule", " & ".join(latex_cell(h) for h in header) + r" \\",
             r"\midrule"]
    for row, marks in zip(cells, bold):
        lines.append(" & ".join(rf"\textbf{{{latex_cell(c)}}}" if b and c else latex_cell(c)
                                for c, b in zip(row, marks)) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def format_table(summary: dict, fmt: str) -> str:
    """The summary on stdout: per set, every method's mean, interval, term means, rank and count of outputs
    more natural than their reference; with several sets, the methods against the sets with the mean rank."""
    if fmt == "csv":
        return summary_csv(summary)
    tables = []
    for s in summary["sets"]:
        header, cells, bests = set_rows(summary, s)
        bold = [[False, b, b] + [False] * (len(header) - 3) for b in bests]  # the best method and its mean
        tables.append((set_heading(s), header, cells, bold, "set"))
    if summary["layout"] == "sets":
        header, cells, bests = overall_rows(summary)
        tables.append((f"all sets: mean {summary['term']} (rank) per set, and the mean rank over "
                       f"{len(summary['sets'])} sets", header, cells, bests, "overall"))
    out = []
    if fmt == "markdown":
        out.append(f"{markdown_cell(caption(summary))}  \n{markdown_cell(provenance_text(summary))}\n")
        for heading, header, cells, bests, kind in tables:
            align = ["---:", ":---", "---:", ":---:"] + ["---:"] * (len(header) - 4) if kind == "set" else \
                [":---"] + ["---:"] * (len(header) - 1)
            out.append(f"**{markdown_cell(heading)}**\n\n{markdown_table(header, cells, bests, align)}\n")
    else:
        out.append(f"% {one_line(caption(summary))}\n% {one_line(provenance_text(summary))}\n")
        for heading, header, cells, bests, kind in tables:
            columns = "rlrc" + "r" * (len(header) - 4) if kind == "set" else "l" + "r" * (len(header) - 1)
            out.append(f"% {one_line(heading)}\n{latex_table(header, cells, bests, columns)}\n")
    return "\n".join(out)


def comment_lines(summary: dict) -> str:
    return f"# {one_line(caption(summary))}\n# {one_line(provenance_text(summary))}\n"


def summary_csv(summary: dict) -> str:
    """One row per (set, method): the summary as CSV, after two '#' lines saying what the numbers are."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["set", "method", "images", "rank", "mean", "interval_low", "interval_high",
                     *(f"mean_{t}" for t in TERMS), "more_natural", "left_out", "mean_rank"])
    for s in summary["sets"]:
        for row, method in zip(s["methods"], summary["methods"]):
            low, high = row["interval"] or ("", "")
            writer.writerow([s["name"], row["name"], s["images"], f"{row['rank']:g}", repr(row["mean"]), low, high,
                             *(repr(row["terms"][t]) for t in TERMS), row["more_natural"], row["left_out"],
                             repr(method["mean_rank"])])
    return comment_lines(summary) + text.getvalue()


def write_csv(path: str | Path, summary: dict) -> None:
    """One row per (set, method, image) with every term, lambda and whether the output was judged more natural
    than its reference, after two '#' lines saying what the numbers are."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["set", "method", "image", "output", "reference", *TERMS, "lambda", "more_natural"])
    for s in summary["sets"]:
        for j in range(len(summary["methods"])):
            for image in s["per_image"]:
                row = image["scores"][j]
                writer.writerow([s["name"], row["method"], image["image"], row["file"], image["reference"],
                                 *(repr(row[t]) for t in TERMS), repr(row["lambda"]), int(row["more_natural"])])
    write_text(path, comment_lines(summary) + text.getvalue())

