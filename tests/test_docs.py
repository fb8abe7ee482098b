"""Docs that stay true: every example of the README and the manual (docs/) runs, or says why it cannot here.

Each ```bash and ```python block is run, page by page in the order a reader meets them, in a fresh folder
laid out as the examples expect: the tiny test model as `afine.pth`, `ViT-B-32.pt`, `data/afine.pth` and run
folders `runs/s1..s3`; the synthetic corpus (afine/synth.py) as `data/`; generated images as `dis.png`,
`ref.png`, `results/`, `references/`; the project's scripts beside them. The released weights are the tiny
model, served on 127.0.0.1 through the address afine/download.py honours (AFINE_WEIGHTS_URL), into a torch
cache of the folder's own. The one other substitution: `--scale small` of afine.synth means a smaller corpus
(tests/docs_runner.py, tiny_scale). Shell blocks run in bash with -e, each command through a fork server
that has imported torch once (tests/docs_runner.py), so the whole manual runs in seconds.

A block that cannot run here (a GPU, the real datasets, a long training, installing packages) carries the
line `<!-- not run: REASON -->` right before its fence; ```text and ```bibtex blocks are not code. Any other
block, or a fence without a language, fails `test_every_example_runs_or_says_why_not`.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import docs_runner
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("bash", "python")
NOT_CODE = ("text", "bibtex")
NOT_RUN = re.compile(r"<!-- not run: (\S[^>]*?) -->")
BLOCK_TIMEOUT_S = 180  # one block; generous for a 2-core machine at load 4 (the whole manual takes seconds)
SCRIPTS = ("evaluate.py", "fit_gamma.py", "demo.py", "train_stage1.py", "train_stage2.py", "train_stage3.py",
           "configs", "bench", "examples")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the reason given, or None: the block runs

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the not-run reason on the line before each, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(.*)$", lines[i])
        if fence:
            indent, language, start = len(fence.group(1)), fence.group(2).strip(), i
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            assert i < len(lines), f"{page.relative_to(ROOT)}:{start + 1}: code block never closed"
            code = "".join(line[indent:] + "\n" for line in lines[start + 1:i])
            mark = NOT_RUN.fullmatch(lines[start - 1].strip()) if start else None
            found.append(Block(page, start + 1, language, code, mark.group(1) if mark else None))
        i += 1
    return found


def prose(page: Path) -> str:
    """The page with its code blocks blanked out (their `#` lines are not headings, their text not links)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for block in blocks(page):
        end = block.line + block.code.count("\n")
        for n in range(block.line - 1, end + 1):
            lines[n] = ""
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the pages


def test_every_example_runs_or_says_why_not():
    problems, runnable = [], 0
    for page in PAGES:
        marks = sum(1 for line in page.read_text(encoding="utf-8").splitlines() if NOT_RUN.search(line))
        found = blocks(page)
        for block in found:
            if not block.language:
                problems.append(f"{block.where()}: a fence without a language (```bash, ```python, ```text)")
            elif block.language not in RUN + NOT_CODE:
                problems.append(f"{block.where()}: ```{block.language}: use bash or python (run), or text")
            elif block.language in NOT_CODE and block.not_run:
                problems.append(f"{block.where()}: a not-run mark on a ```{block.language} block")
            runnable += block.language in RUN and not block.not_run
        if marks != sum(1 for b in found if b.not_run):
            problems.append(f"{page.relative_to(ROOT)}: a not-run mark that is not right before a fence")
    assert not problems, "\n".join(problems)
    assert runnable >= 15  # the test below has something to run


def test_blocks_and_marks_are_found_as_written(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n```bash\nafine score a b\n```\n<!-- not run: needs a GPU -->\n```python\n"
                    "import torch\n```\n\n- item\n\n  ```text\n  layout\n  ```\n<!-- not run: x -->\n\n"
                    "```bash\nls\n```\n")
    found = blocks(page)
    assert [(b.line, b.language, b.code, b.not_run) for b in found] == [
        (3, "bash", "afine score a b\n", None), (7, "python", "import torch\n", "needs a GPU"),
        (13, "text", "layout\n", None), (18, "bash", "ls\n", None)]  # a mark must be right before its fence
    assert "afine score" not in prose(page) and "# T" in prose(page)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped but hyphens, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_point_to_files_and_headings_that_exist():
    anchors = {page: {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page), re.M)} for page in PAGES}
    broken = []
    for page in PAGES:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and anchor not in anchors.get(path, set()):
                broken.append(f"{page.relative_to(ROOT)}: {target}: no such heading")
    assert not broken, "\n".join(broken)
    assert slug("Fit the NR mapping and the final scale") == "fit-the-nr-mapping-and-the-final-scale"
    assert slug("Worked example: a denoiser") == "worked-example-a-denoiser"


def test_readme_gives_the_test_command_ci_runs_licence_and_citation():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"&& (python -m pytest[^#\n]*?)\s+# the test suite", readme).group(1)
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command  # exactly the README's command
    assert len(readme.splitlines()) <= 250  # a front page; the details are in docs/
    title = re.search(r"title\s*=\s*\{(.+?)\},?\n", readme).group(1)
    assert f'title: "{title}"' in (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert "arxiv.org/abs/2503.11221" in readme and "github.com/ChrisDud0257/AFINE" in readme
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)


# ---------------------------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The one tiny model every example uses: its checkpoint files in every format. (Its seeds give scores whose
    MOS logistic fits converge in a few hundred steps; some random models take tens of seconds per evaluate.py.)"""
    return write_checkpoints(tmp_path_factory.mktemp("docs_model"), random_afine(tiny_clip(seed=4), seed=5))


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny):
    """The folder every page's examples start from (copied afresh per page)."""
    from afine import synth

    root = tmp_path_factory.mktemp("docs_world")
    for name in SCRIPTS:
        (root / name).symlink_to(ROOT / name)
    synth.SCALES["docs"] = docs_runner.tiny_scale()
    try:
        synth.generate(root / "data", seed=0, scale="docs", progress=False)
    finally:
        del synth.SCALES["docs"]
    for target in ("afine.pth", "data/afine.pth"):
        shutil.copy(tiny["afine"], root / target)
    for target in ("ViT-B-32.pt", "data/ViT-B-32.pt"):
        shutil.copy(tiny["clip_ts"], root / target)
    log = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(0, 40, 10)] + [
        {"step": 20, "val": {"KADID10K": 0.7}, "val_mean": 0.7, "best": "best/"}]
    for run in ("runs/s1", "runs/s2", "runs/s3", "sweep/lr1e-3", "sweep/lr3e-3", "sweep/lr1e-2"):
        if run.startswith("runs/"):
            shutil.copytree(tiny["folder"], root / run)
        (root / run).mkdir(parents=True, exist_ok=True)
        (root / run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    rng = np.random.default_rng(0)
    for name in ("dis.png", "ref.png", "results/0001.png", "results/0002.jpg", "results/ref.png",
                 "references/0001.png", "references/0002.png", "references/ref.png"):
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / name)
    (root / "pairs.txt").write_text("dis.png,ref.png\nresults/0001.png,references/0001.png\n")
    rows = []  # a CSV of someone's own scores: the synthetic KADID-like images, by path
    for mos in sorted((root / "data" / "KADID10K").glob("*/MOS/*.txt")):
        for line in mos.read_text().splitlines():
            dis, ref, value = line.split(",")[:3]
            rows.append(f"data/KADID10K/images/{dis},data/KADID10K/images/{ref},{value}\n")
    (root / "my_scores.csv").write_text("dis,ref,mos\n" + "".join(rows))
    return root


@pytest.fixture(scope="module")
def weights_url(tiny):
    """The released weights, as a local server gives them: the tiny model's afine.pth."""
    body = tiny["afine"].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/afine.pth":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that went away: nothing for the test's output

    httpd = Quiet(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/afine.pth"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def base_env(tmp_path_factory, weights_url):
    """The environment of every example: shims first on PATH, the project importable as if installed."""
    shims = tmp_path_factory.mktemp("docs_shims")
    runner = Path(docs_runner.__file__).resolve()
    for name in ("afine", "python"):
        (shims / name).write_text(f'#!/bin/sh\nexec "$DOCS_REAL_PYTHON" -S "{runner}" shim {name} "$@"\n')
        (shims / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("AFINE_WEIGHTS", "AFINE_OFFLINE", "HF_HUB_OFFLINE", "TORCH_HOME", "PYTHONPATH")}
    env.update(PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", AFINE_WEIGHTS_URL=weights_url, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
               DOCS_REAL_PYTHON=sys.executable, DOCS_SERVER=str(shims / "server.sock"))
    return env


@pytest.fixture(scope="module")
def server(base_env, tmp_path_factory):
    """The fork server the shims talk to, in a session of its own; stopped (with anything it runs) at the end."""
    log = tmp_path_factory.mktemp("docs_server") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, docs_runner.__file__, "serve", base_env["DOCS_SERVER"]],
                                cwd=ROOT, env=base_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready and proc.stdout.readline() == b"ready\n", f"docs server did not start:\n{log.read_text()}"
        yield log
    finally:
        proc.stdin.close()  # the server kills what it still runs and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def run_block(block: Block, folder: Path, env: dict, timeout: float = BLOCK_TIMEOUT_S) -> tuple[int | None, str]:
    """(exit code, or None on timeout; output) of one block run in `folder`. The output goes to a file, not a
    pipe, so that nothing the block started can keep the test waiting; its process group is killed at the end."""
    if block.language == "python":
        argv = [str(Path(env["PATH"].split(os.pathsep)[0]) / "python"), "-c", block.code]
    else:
        argv = ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", block.code]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None  # the shims die with the group below, so the server kills the commands they ran
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # a timed-out block, or what a block left in the background
            proc.wait()
        out.seek(0)
        return code, out.read().decode("utf-8", "backslashreplace")


RUNNABLE = {page: [b for b in blocks(page) if b.language in RUN and not b.not_run] for page in PAGES}


@pytest.mark.parametrize("page", [p for p in PAGES if RUNNABLE[p]], ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, template, base_env, server, tmp_path):
    folder = tmp_path / "world"
    shutil.copytree(template, folder, symlinks=True)
    env = {**base_env, "TORCH_HOME": str(folder / ".torch")}  # an empty cache: the first use downloads
    failures = []
    for block in RUNNABLE[page]:
        code, out = run_block(block, folder, env)
        if code != 0:
            status = f"timed out after {BLOCK_TIMEOUT_S} s" if code is None else f"exit code {code}"
            failures.append(f"{block.where()}: ```{block.language} block, {status}:\n{block.code}--- output:\n"
                            f"{out[-3000:]}")
    assert not failures, "\n\n".join(failures)


def test_the_runner_gives_exit_codes_output_and_leaves_no_process(template, base_env, server, tmp_path):
    """What the examples' runner reports is what the shell would: exit codes, output; a hung block is killed."""
    folder = tmp_path / "world"
    shutil.copytree(template, folder, symlinks=True)
    env = {**base_env, "TORCH_HOME": str(folder / ".torch")}

    def bash(code: str, timeout: float = BLOCK_TIMEOUT_S):
        return run_block(Block(ROOT, 0, "bash", code, None), folder, env, timeout)

    code, out = bash("afine score --weights afine.pth --json dis.png ref.png > one.jsonl\nwc -l < one.jsonl")
    assert (code, out.split()[-1]) == (0, "1")
    assert set(json.loads((folder / "one.jsonl").read_text())) >= {"afine_all", "afine_all_scale"}
    code, out = bash("afine score --weights afine.pth missing.png ref.png")
    assert code == 2 and out.startswith("error: ") and "missing.png" in out
    assert bash("python -c 'import sys; sys.exit(3)'")[0] == 3
    code, out = bash("python -c 'raise ValueError(\"shown\")'")
    assert code == 1 and "ValueError: shown" in out
    assert bash("python -m afine.labels no-such-command")[0] == 2
    assert bash("false\nafine score --weights afine.pth dis.png ref.png > never.txt")[0] == 1  # -e: stops at once
    assert not (folder / "never.txt").exists()

    code, _ = bash("python -c 'import os, time; open(\"pid\", \"w\").write(str(os.getpid())); time.sleep(600)'",
                   timeout=5)
    assert code is None  # timed out: the block's process group is killed, and the server kills the command
    pid = int((folder / "pid").read_text())
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail(f"the command of a timed-out block (pid {pid}) is still running")
