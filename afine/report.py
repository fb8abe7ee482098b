"""The visual report of `afine compare --html DIR` (docs/compare.md, "The visual report").

One folder, opened from disk and offline: `index.html` with its CSS and JavaScript inline, and `thumbs/` with a
small JPEG of every image it shows. It loads nothing else (its Content-Security-Policy tells the browser so too),
so it still works when the folder is moved or zipped; each thumbnail links to the full-size original (a file://
address, which opens while the original stays where it was).

Names come from users' file systems. Every file, folder, set and method name enters the page through
html.escape; the numbers and names the script reads are JSON inside <script type="application/json"> with <, >
and & written as \\u003c, \\u003e, \\u0026, so nothing in it can end the element; the script writes text with
textContent only. Thumbnails are named by position, never after a file.

The page's state is its address: `#set=1&sort=m2&order=desc`, `#sort=spread`, `#sort=disagree&a=0&b=2` (sets and
methods by position; `&grid` scrolls to the images), so a view can be bookmarked or shared, and a test can open one.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .atomic import atomic_folder, check_writable, reason
from .errors import AfineError, printable
from .image import load_image
from .model import TERMS

MARKER = ".afine-report"  # in every report folder: a later run may replace the folder as a whole
THUMB = 200  # pixels, the long side of a thumbnail
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def check_folder(path: Path, folders: list[Path], inputs: list[Path]) -> None:
    """AfineError unless the report can go to `path` without touching an input: a new folder, an empty one, or
    an earlier report (replaced as a whole), outside every input folder and holding no input."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise AfineError(f"{path}: cannot write the report there, a file or symbolic link is in the way")
    where = path.resolve()
    for folder in folders:
        inside = folder.resolve()
        if where == inside or where.is_relative_to(inside):
            raise AfineError(f"{path}: the report would go into {folder}, which this command reads; choose a folder "
                             f"outside it")
    for source in [*folders, *inputs]:
        if source.resolve().is_relative_to(where):
            raise AfineError(f"{path}: holds {source}, which this command reads; choose another --html folder")
    try:
        if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
            raise AfineError(f"{path}: not empty and not an earlier report; choose a new --html folder")
    except OSError as e:
        raise AfineError(f"{path}: cannot read folder ({reason(e)})") from None
    check_writable(path / "index.html")


def save_thumbnail(source: Path, target: Path) -> None:
    """A JPEG of at most THUMB pixels a side, decoded as it was scored (EXIF orientation applied)."""
    pixels = load_image(source, warn_size=False).mul(255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels)
    image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    image.save(target, quality=88)


def write(path: Path, summary: dict, sets: list, progress: bool = True) -> None:
    """The report folder: built beside `path`, then renamed into place (an earlier report is replaced only once
    the new one is complete)."""
    earlier = (path / MARKER).is_file()
    target = path.with_name(f".{path.name}.new-{os.getpid()}") if earlier else path
    jobs = []
    for si, test_set in enumerate(sets):
        for i, ref in enumerate(test_set.references):
            jobs.append((ref, Path("thumbs", f"s{si}", f"r{i}.jpg")))
            jobs += [(outputs[i], Path("thumbs", f"s{si}", f"r{i}m{j}.jpg")) for j, outputs in
                     enumerate(test_set.outputs)]
    with atomic_folder(target) as tmp:
        for si in range(len(sets)):
            (tmp / "thumbs" / f"s{si}").mkdir(parents=True)
        with ThreadPoolExecutor(max_workers=4) as pool, tqdm(total=len(jobs), desc="report", unit="image",
                                                              disable=not progress, file=sys.stderr) as bar:
            for _ in pool.map(lambda job: save_thumbnail(job[0], tmp / job[1]), jobs):
                bar.update()
        (tmp / "index.html").write_text(page(summary, sets), encoding="utf-8")
        (tmp / MARKER).write_text("written by afine compare --html; the next run may replace this folder\n")
    if earlier:
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            os.rename(path, aside)
            os.rename(target, path)
        except OSError as e:
            if aside.exists() and not path.exists():
                os.rename(aside, path)
            shutil.rmtree(target, ignore_errors=True)
            raise AfineError(f"{path}: cannot replace the earlier report ({reason(e)})") from None
        shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the page


def script_json(value) -> str:
    """JSON that can stand inside <script type="application/json">: no <, > or & (so no </script> and no <!--)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def text(value) -> str:
    return html.escape(printable(value), quote=True)


def number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def link(path: Path) -> str:
    """The file:// address of an original (every byte of its name percent-encoded as needed), for an href."""
    return text(Path(os.path.abspath(path)).as_uri())


def summary_table(summary: dict, s: dict) -> str:
    term = summary["term"]
    others = [t for t in TERMS if t != term]
    head = "".join(f"<th>{text(h)}</th>" for h in ["rank", "method", f"{term} (lower is better)", "95% interval",
                                                    *others, "more natural than the reference", "left out"])
    best = min(row["rank"] for row in s["methods"])
    body = []
    for row in s["methods"]:
        interval = f"[{number(row['interval'][0])}, {number(row['interval'][1])}]" if row["interval"] else ""
        cells = [f"{row['rank']:g}", text(row["name"]), number(row["mean"]), interval,
                 *(number(row["terms"][t]) for t in others), f"{row['more_natural']} of {s['images']}",
                 str(row["left_out"])]
        mark = ' class="best"' if row["rank"] == best else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def pairwise_table(summary: dict, s: dict) -> str:
    """Row A, column B: the share of images on which A scores better (lower) than B, coloured from red (never)
    to green (always), with the ties and the Wilcoxon p-value."""
    names = [row["name"] for row in s["methods"]]
    cell = {}
    for p in s["pairwise"]:
        a, b = names.index(p["a"]), names.index(p["b"])
        cell[a, b] = (p["a_better_fraction"], p["tie_fraction"], p["p_value"])
        cell[b, a] = (p["b_better_fraction"], p["tie_fraction"], p["p_value"])
    head = "<th>better than →</th>" + "".join(f"<th>{text(n)}</th>" for n in names)
    rows = []
    for a, name in enumerate(names):
        cells = []
        for b in range(len(names)):
            if a == b:
                cells.append('<td class="diagonal">—</td>')
                continue
            better, ties, p = cell[a, b]
            pv = "all tie" if p is None else f"p = {p:.2g}"
            strong = ' class="significant"' if p is not None and p < 0.05 else ""
            cells.append(f'<td style="background: hsl({120 * better:.0f}, 60%, 84%)"{strong}>'
                         f'{100 * better:.0f}%<small>ties {100 * ties:.0f}%, {pv}</small></td>')
        rows.append(f"<tr><th>{text(name)}</th>{''.join(cells)}</tr>")
    return f'<table class="pairwise"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def grid_rows(summary: dict, sets: list) -> tuple[str, list[dict]]:
    """The grid's rows (one per image: the reference, then every method's output with its score) and the data
    the script sorts them by."""
    term = summary["term"]
    rows, data = [], []
    for si, (s, test_set) in enumerate(zip(summary["sets"], sets)):
        for i, image in enumerate(s["per_image"]):
            scores = [row[term] for row in image["scores"]]
            best = min(scores)
            ref = test_set.references[i]
            cells = [f'<td class="ref"><a href="{link(ref)}"><img src="thumbs/s{si}/r{i}.jpg" alt="reference"></a>'
                     f'<div class="name">{text(image["image"])}</div><div class="set">{text(s["name"])}</div></td>']
            for j, row in enumerate(image["scores"]):
                badge = '<span class="badge">more natural than the reference</span>' if row["more_natural"] else ""
                star = '<span class="star">best</span>' if row[term] == best else ""
                mark = ' class="out best"' if row[term] == best else ' class="out"'
                cells.append(
                    f'<td{mark}><a href="{link(test_set.outputs[j][i])}"><img src="thumbs/s{si}/r{i}m{j}.jpg" '
                    f'alt="{text(row["method"])}"></a><div class="score">{number(row[term])}{star}</div>{badge}'
                    f'<details><summary>F, λ, N</summary><dl>'
                    f'<dt>F (fidelity)</dt><dd>{number(row["afine_fr"])}</dd>'
                    f'<dt>λ = exp(k (N(ref) − N))</dt><dd>{number(row["lambda"])}</dd>'
                    f'<dt>N (naturalness)</dt><dd>{number(row["afine_nr"])}</dd>'
                    f'<dt>N(ref)</dt><dd>{number(row["afine_nr_ref"])}</dd>'
                    f'<dt>D = F + λ N</dt><dd>{number(row["afine_all"])}</dd></dl></details></td>')
            rows.append(f'<tr data-row="{len(data)}" data-set="{si}">{"".join(cells)}</tr>')
            data.append({"set": si, "name": image["image"], "scores": scores})
    return "".join(rows), data


def options(values: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{text(v)}">{text(label)}</option>' for v, label in values)


def page(summary: dict, sets: list) -> str:
    """index.html: the summary and pairwise tables per set, then the grid with its controls."""
    term, facts = summary["term"], summary["produced_by"]
    weights = ", ".join(f"{w['file']} (SHA-256 {w['sha256']})" for w in facts["weights"])
    clip = f"; CLIP {facts['clip']['file']} (SHA-256 {facts['clip']['sha256']})" if facts["clip"] else ""
    sections = []
    for s in summary["sets"]:
        left = f", {s['references_left_out']} references without every output left out" \
            if s["references_left_out"] else ""
        sections.append(f'<section class="set"><h2>{text(s["name"])} <small>{s["images"]} images{left}</small></h2>'
                        f'{summary_table(summary, s)}<h3>Pairwise: how often the row beats the column</h3>'
                        f'{pairwise_table(summary, s)}</section>')
    rows, data = grid_rows(summary, sets)
    names = [m["name"] for m in summary["methods"]]
    head = "<th>reference</th>" + "".join(f"<th>{text(n)}</th>" for n in names)
    set_choices = options([("all", "all sets")] + [(str(i), s["name"]) for i, s in enumerate(summary["sets"])])
    sort_choices = options([("name", "file name")] + [(f"m{j}", f"{n}'s score") for j, n in enumerate(names)]
                           + [("spread", "spread between methods"), ("disagree", "disagreement of the two below")])
    method_choices = options([(str(j), n) for j, n in enumerate(names)])
    blob = script_json({"term": term, "methods": names, "sets": [s["name"] for s in summary["sets"]], "rows": data})
    return TEMPLATE.format(
        csp=CSP, title=text(f"A-FINE comparison: {', '.join(names)}"), term=text(term),
        resamples=summary["bootstrap"]["resamples"],
        provenance=text(f"afine {facts['afine']}, weights {weights}{clip}, precision {facts['precision']}, "
                        f"device {facts['device']}, torch {facts['torch']}"),
        sections="".join(sections), set_choices=set_choices, sort_choices=sort_choices,
        method_choices=method_choices, head=head, rows=rows, blob=blob, script=SCRIPT)


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="generator" content="afine compare">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0 24px 48px; color: #222; background: #fafafa; }}
h1 {{ font-size: 22px; margin: 18px 0 4px; }}
h2 {{ font-size: 18px; margin: 28px 0 8px; }}
h2 small, .provenance {{ color: #666; font-weight: normal; font-size: 13px; }}
h3 {{ font-size: 14px; margin: 16px 0 6px; }}
table {{ border-collapse: collapse; background: #fff; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }}
th {{ background: #f0f0f0; font-weight: 600; }}
.summary td {{ white-space: nowrap; }}
.summary td:nth-child(2), th {{ text-align: left; }}
.summary tr.best td {{ font-weight: 600; background: #eaf6ea; }}
.pairwise td small {{ display: block; color: #555; font-size: 11px; }}
.pairwise td.significant {{ font-weight: 600; }}
.pairwise td.diagonal {{ background: #f4f4f4; text-align: center; }}
.controls {{ position: sticky; top: 0; z-index: 1; background: #fafafa; padding: 10px 0; border-bottom: 1px solid #ddd;
  display: flex; flex-wrap: wrap; gap: 14px; align-items: center; }}
#grid td {{ text-align: center; width: 168px; }}
#grid img {{ width: 160px; height: auto; display: block; margin: 0 auto; }}
#grid .name {{ font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }}
#grid .set {{ color: #777; font-size: 12px; }}
#grid .score {{ font-size: 15px; font-variant-numeric: tabular-nums; margin-top: 4px; }}
#grid td.best {{ background: #eaf6ea; }}
.star {{ margin-left: 6px; font-size: 11px; color: #fff; background: #2e7d32; border-radius: 8px; padding: 1px 6px; }}
.badge {{ display: inline-block; margin-top: 4px; font-size: 11px; color: #5d3a00; background: #ffe0a3;
  border-radius: 8px; padding: 1px 6px; }}
details {{ font-size: 12px; margin-top: 4px; }}
dl {{ display: grid; grid-template-columns: auto auto; gap: 0 8px; margin: 4px 0; text-align: left; }}
dd {{ margin: 0; text-align: right; font-variant-numeric: tabular-nums; }}
#jumped {{ color: #555; }}
</style>
</head>
<body>
<h1>A-FINE comparison</h1>
<p>Term <b>{term}</b>: <b>lower is better</b>. Means over each set's images with 95% bootstrap intervals
({resamples} resamples); rank 1 is the best. “More natural than the reference”: the output's naturalness N is
better than its reference's, the case A-FINE was built for (D = F + λ N, λ = exp(k (N(ref) − N))).</p>
<p class="provenance">{provenance}</p>
{sections}
<h2 id="images">Images</h2>
<div class="controls">
<label>set <select id="set">{set_choices}</select></label>
<label>sort by <select id="sort">{sort_choices}</select></label>
<label><select id="order"><option value="asc">lowest first</option><option value="desc">highest first</option>
</select></label>
<label>disagreement of <select id="a">{method_choices}</select> and <select id="b">{method_choices}</select></label>
<button id="jump" type="button">show where they disagree most</button>
<span id="jumped"></span>
</div>
<table id="grid"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<script type="application/json" id="data">{blob}</script>
<script>{script}</script>
</body>
</html>
"""

SCRIPT = """
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const body = document.querySelector("#grid tbody");
const rows = Array.from(body.querySelectorAll("tr"));
const control = (id) => document.getElementById(id);
const methods = data.methods.length;

function state() {
  const p = new URLSearchParams(location.hash.slice(1));
  const pick = (name, fallback, ok) => (p.has(name) && ok(p.get(name)) ? p.get(name) : fallback);
  const index = (v) => /^[0-9]+$/.test(v) && Number(v) < methods;
  return {
    set: pick("set", "all", (v) => v === "all" || (/^[0-9]+$/.test(v) && Number(v) < data.sets.length)),
    sort: pick("sort", "name", (v) => ["name", "spread", "disagree"].includes(v) ||
                                      (/^m[0-9]+$/.test(v) && Number(v.slice(1)) < methods)),
    order: pick("order", "", (v) => v === "asc" || v === "desc"),
    a: pick("a", "0", index), b: pick("b", String(Math.min(1, methods - 1)), index),
  };
}

function key(row, s) {
  const scores = row.scores;
  if (s.sort === "spread") return Math.max(...scores) - Math.min(...scores);
  if (s.sort === "disagree") return Math.abs(scores[Number(s.a)] - scores[Number(s.b)]);
  if (s.sort[0] === "m") return scores[Number(s.sort.slice(1))];
  return null;
}

function apply() {
  const s = state();
  const order = s.order || (s.sort === "spread" || s.sort === "disagree" ? "desc" : "asc");
  const sign = order === "desc" ? -1 : 1;
  const byName = (i, j) => (data.rows[i].name < data.rows[j].name ? -1 : data.rows[i].name > data.rows[j].name ? 1 :
                            data.rows[i].set - data.rows[j].set || i - j);
  const indices = data.rows.map((_, i) => i);
  indices.sort((i, j) => {
    const ki = key(data.rows[i], s), kj = key(data.rows[j], s);
    return (ki === null ? sign * byName(i, j) : sign * (ki - kj) || byName(i, j));
  });
  for (const i of indices) {
    rows[i].hidden = s.set !== "all" && String(data.rows[i].set) !== s.set;
    body.appendChild(rows[i]);
  }
  for (const id of ["set", "sort", "a", "b"]) control(id).value = s[id];
  control("order").value = order;
  const first = indices.find((i) => !rows[i].hidden);
  control("jumped").textContent = s.sort === "disagree" && first !== undefined
    ? "largest disagreement: " + data.rows[first].name + " (" + data.methods[Number(s.a)] + " " +
      data.rows[first].scores[Number(s.a)].toFixed(4) + ", " + data.methods[Number(s.b)] + " " +
      data.rows[first].scores[Number(s.b)].toFixed(4) + ")"
    : "";
  document.documentElement.dataset.view = [s.set, s.sort, order, s.a, s.b].join(" ");
}

function go(changes) {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const [k, v] of Object.entries(changes)) p.set(k, v);
  history.replaceState(null, "", "#" + p.toString());
  apply();
}

control("set").addEventListener("change", (e) => go({set: e.target.value}));
control("sort").addEventListener("change", (e) => go({sort: e.target.value, order: ""}));
control("order").addEventListener("change", (e) => go({order: e.target.value}));
control("a").addEventListener("change", (e) => go({a: e.target.value}));
control("b").addEventListener("change", (e) => go({b: e.target.value}));
control("jump").addEventListener("click", () => {
  go({sort: "disagree", order: "desc", a: control("a").value, b: control("b").value});
  document.getElementById("grid").scrollIntoView();
});
window.addEventListener("hashchange", apply);
apply();
if (new URLSearchParams(location.hash.slice(1)).has("grid")) control("images").scrollIntoView();
"""
