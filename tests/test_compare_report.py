"""The report of `afine compare --html` in a real browser (headless Chromium, tests/browser.py): opened from
file:// after the folder was moved, its scripts run, the rows, sorting, filtering, the jump to where two methods
disagree, the best marks and badges are checked in the resulting page, names stay text, and the page requests
nothing outside its folder. Skipped when Chromium is not installed; .ci/run installs it and sets
AFINE_REQUIRE_CHROMIUM=1, which turns the skip into a failure."""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afine.__main__ import main
from tests.browser import Browser, find_chromium
from tests.tiny import random_afine, tiny_clip, write_checkpoints

MARKUP = "<img src=x onerror=\"document.title='pwned'\">.png"
METHOD = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def chromium():
    found = find_chromium()
    if found is None:
        if os.environ.get("AFINE_REQUIRE_CHROMIUM"):
            pytest.fail("AFINE_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; CI installs it)")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report over two sets of three images and three methods, one of them named with HTML, one image named
    with HTML and one not UTF-8; the report folder is then moved. Returns its folder and the JSON summary."""
    root = tmp_path_factory.mktemp("report")
    model = random_afine(tiny_clip(seed=7))
    with torch.no_grad():  # naturalness centred on these images' raw N: some outputs are more natural
        model.natural_scale.yita3.fill_(28.0)
        model.natural_scale.yita4.fill_(3.0)
    weights = write_checkpoints(root / "ckpt", model)["afine"]
    rng = np.random.default_rng(2)
    names = {"A": ["a.png", MARKUP, os.fsdecode(b"\xffz.png")], "B": ["b0.png", "b1.png", "b2.png"]}
    for test_set, files in names.items():
        for i, name in enumerate(files):
            shape = (40, 56, 3) if i % 2 else (48, 32, 3)
            base = rng.integers(0, 256, shape).astype(np.float64)
            outputs = [base + rng.integers(-9, 10, shape), base + rng.integers(-40, 41, shape),
                       (base + np.roll(base, 1, 0) + np.roll(base, 1, 1)) / 3]
            for folder, image in zip(["HR", "m0", "m1", "m2"], [base, *outputs]):
                (root / folder / test_set).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / folder / test_set / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch"))  # the digest cache: before the tests' own (conftest.py)
        code = main(["compare", "--weights", str(weights), "--no-progress", "--device", "cpu", "--bootstrap", "100",
                     str(root / "HR"), str(root / "m0"), f"{METHOD}={root / 'm1'}", str(root / "m2"),
                     "--html", str(root / "made"), "--json", str(root / "c.json")])
    assert code == 0
    (root / "moved").mkdir()
    shutil.move(root / "made", root / "moved" / "report")
    return root / "moved" / "report", json.loads((root / "c.json").read_text())


@pytest.fixture(scope="module")
def browser(chromium):
    b = Browser(chromium)
    yield b
    b.close()
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if b.profile.encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            continue
    assert not left, f"chromium processes left behind: {left}"


PAGE = """JSON.stringify({
  rows: Array.from(document.querySelectorAll('#grid tbody tr')).map((tr) => Number(tr.dataset.row)),
  hidden: Array.from(document.querySelectorAll('#grid tbody tr')).map((tr) => tr.hidden),
  best: Array.from(document.querySelectorAll('#grid tbody tr')).map((tr) =>
    Array.from(tr.querySelectorAll('td.out')).map((td) => td.classList.contains('best'))),
  badges: Array.from(document.querySelectorAll('#grid tbody tr')).map((tr) =>
    Array.from(tr.querySelectorAll('td.out')).map((td) => td.querySelector('.badge') !== null)),
  names: Array.from(document.querySelectorAll('#grid tbody tr .name')).map((e) => e.textContent),
  heads: Array.from(document.querySelectorAll('#grid thead th')).map((e) => e.textContent),
  images: Array.from(document.images).map((i) => i.complete && i.naturalWidth > 0),
  links: Array.from(document.querySelectorAll('#grid a')).map((a) => a.href),
  scripts: document.scripts.length, title: document.title, hash: location.hash,
  jumped: document.getElementById('jumped').textContent, scrolled: window.scrollY,
  hooked: document.querySelectorAll('img[src="x"]').length,
})"""


def rows(summary: dict) -> list[dict]:
    """The grid's rows in the page's data order: every image of every set, with each method's score."""
    return [{"set": si, "name": image["image"], "scores": [row["afine_all_scale"] for row in image["scores"]],
             "natural": [row["more_natural"] for row in image["scores"]]}
            for si, s in enumerate(summary["sets"]) for image in s["per_image"]]


def view(browser: Browser, folder: Path, state: str) -> dict:
    browser.open("about:blank")
    browser.open((folder / "index.html").as_uri() + state)
    return json.loads(browser.evaluate(PAGE))


def test_the_page_shows_rows_sorted_with_best_marks_and_badges(browser, report):
    folder, summary = report
    data = rows(summary)
    page = view(browser, folder, "#sort=m1&grid")
    expected = sorted(range(len(data)), key=lambda i: (data[i]["scores"][1], data[i]["name"]))
    assert page["rows"] == expected and not any(page["hidden"])
    assert page["scrolled"] > 0  # "grid": the images, not the tables, in view
    assert page["best"] == [[s == min(data[i]["scores"]) for s in data[i]["scores"]] for i in expected]
    assert page["badges"] == [data[i]["natural"] for i in expected]
    assert any(any(b) for b in page["badges"]) and not all(all(b) for b in page["badges"])
    assert page["heads"] == ["reference", "m0", METHOD, "m2"]  # the method's name as text
    assert sorted(page["names"]) == sorted(["a.png", MARKUP, "\\xffz.png", "b0.png", "b1.png", "b2.png"])
    assert page["title"] == "A-FINE comparison: m0, " + METHOD + ", m2" and page["hooked"] == 0
    assert page["scripts"] == 2  # the JSON data and the page's own script: no name became a script
    assert len(page["images"]) == len(data) * 4 and all(page["images"])  # every thumbnail loaded
    for link in page["links"]:  # each thumbnail opens the original, which is where the link says
        assert link.startswith("file:///")
        assert os.path.isfile(urllib.parse.unquote_to_bytes(link[len("file://"):]))


def test_filter_by_set_sort_by_spread_and_jump_to_the_largest_disagreement(browser, report):
    folder, summary = report
    data = rows(summary)
    page = view(browser, folder, "#set=1&sort=spread")
    visible = [i for i, hidden in zip(page["rows"], page["hidden"]) if not hidden]
    spread = [max(r["scores"]) - min(r["scores"]) for r in data]
    assert visible == sorted([i for i in range(len(data)) if data[i]["set"] == 1], key=lambda i: -spread[i])
    browser.evaluate("""for (const [id, value] of [['set', 'all'], ['a', '0'], ['b', '2']]) {
                          const select = document.getElementById(id);
                          select.value = value;
                          select.dispatchEvent(new Event('change'));
                        }
                        document.getElementById('jump').click();""")
    clicked = json.loads(browser.evaluate(PAGE))
    apart = [abs(r["scores"][0] - r["scores"][2]) for r in data]
    assert clicked["rows"] == sorted(range(len(data)), key=lambda i: (-apart[i], data[i]["name"], data[i]["set"]))
    assert not any(clicked["hidden"])
    first = data[clicked["rows"][0]]
    assert clicked["jumped"] == (f"largest disagreement: {first['name']} (m0 {first['scores'][0]:.4f}, m2 "
                                 f"{first['scores'][2]:.4f})")
    assert urllib.parse.parse_qs(clicked["hash"][1:]) == {"set": ["all"], "sort": ["disagree"], "order": ["desc"],
                                                          "a": ["0"], "b": ["2"]}


def test_the_page_requests_nothing_outside_its_folder(browser, report):
    folder, _ = report
    view(browser, folder, "")
    requested = browser.requests()
    inside = folder.as_uri() + "/"
    assert requested[0] == folder.as_uri() + "/index.html"
    assert requested and all(url.startswith(inside) for url in requested), requested
    assert len([url for url in requested if url.startswith(inside + "thumbs/")]) == len(list(folder.rglob("*.jpg")))
