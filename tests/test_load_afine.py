"""One call to a model: `load_afine()` is the released model (the cache, or a download from a local server), the
weights come first (the order before 0.2 warns), and a model loaded for scoring exports whole."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import afine
from afine.checkpoint import PART_FILES, read_afine_parts, save_afine
from afine.errors import AfineError
from afine.model import AFINE, TERMS, load_afine
from tests import procs
from tests.test_download import cache_path, files, server, server_url  # noqa: F401 - the local weights server
from tests.tiny import random_afine, tiny_clip, write_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("load_afine")
    paths = write_checkpoints(folder, random_afine(tiny_clip(seed=8), seed=8))
    paths["heads"] = folder / "heads"
    paths["heads"].mkdir()
    for name in PART_FILES.values():
        if name != "clip_model.pth":
            shutil.copy(paths["folder"] / name, paths["heads"] / name)
    return paths


def scores(model: AFINE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.rand(2, 3, 64, 96, generator=g), torch.rand(2, 3, 64, 96, generator=g))


def same(a: AFINE, b: AFINE) -> bool:
    x, y = scores(a), scores(b)
    return all(torch.equal(x[t], y[t]) for t in TERMS)


# ------------------------------------------------------------------------------------------- the released model


def test_no_argument_is_the_released_model_from_the_cache(files, server):  # noqa: F811
    cache_path().parent.mkdir(parents=True)
    shutil.copy(files[0], cache_path())
    assert same(load_afine(), load_afine(files[0]))
    assert server.requests == 0  # in the cache: never downloaded again


def test_no_argument_downloads_the_released_model_on_first_use(files, server, capsys):  # noqa: F811
    model = load_afine()
    assert server.requests == 1 and cache_path().read_bytes() == files[0].read_bytes()
    assert f"downloaded {server_url()} to {cache_path()}" in capsys.readouterr().err
    assert same(model, load_afine(files[0]))
    load_afine()
    assert server.requests == 1


def test_no_argument_never_keeps_a_download_that_does_not_load(files, server, tmp_path):  # noqa: F811
    parts = torch.load(files[0], weights_only=True)
    parts["natural"]["proj_feat.weights"] = parts["natural"].pop("proj_feat.weight")  # a head with a wrong key
    torch.save(parts, tmp_path / "wrong.pth")
    server.body = (tmp_path / "wrong.pth").read_bytes()
    with pytest.raises(AfineError) as info:
        load_afine()
    assert str(info.value) == (f"{server_url()}: cannot download the A-FINE weights (what arrived is not a merged "
                               "A-FINE checkpoint: afine.pth[natural]: wrong keys: missing keys ['proj_feat.weight']; "
                               "unexpected keys ['proj_feat.weights']); download the file yourself and put it at "
                               f'{cache_path()}, or pass the file: load_afine("afine.pth")')
    assert [p.name for p in cache_path().parent.iterdir()] == ["afine.pth.lock"]  # nothing kept


@pytest.mark.parametrize("switch", ["AFINE_OFFLINE", "HF_HUB_OFFLINE"])
def test_no_argument_offline_without_the_cache_is_one_line_telling_what_to_do(server, monkeypatch, switch):  # noqa: F811
    monkeypatch.setenv(switch, "1")
    with pytest.raises(AfineError) as info:
        load_afine()
    assert str(info.value) == (f"{cache_path()}: the released A-FINE weights are not there and downloads are off "
                               f"({switch}=1); download {server_url()} and put it at {cache_path()}, or pass the "
                               'file: load_afine("afine.pth")')
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chain of tracebacks
    assert server.requests == 0


def python_c(code: str, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` as a user runs it, in its own session, with this test's cache and download address."""
    return procs.run([sys.executable, "-c", code], cwd=ROOT, timeout=240,
                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


def test_python_c_load_afine_works_from_the_cache_and_offline_says_why_in_one_line(files, tmp_path):  # noqa: F811
    weights, dis, ref = files
    released = tmp_path / "cache" / "afine.pth"
    code = ("import afine; model = afine.load_afine(); "  # the README's first example: import, load, score
            f"terms = model(afine.load_image({str(dis)!r})[None], afine.load_image({str(ref)!r})[None]); "
            "print(terms['afine_all'].item())")
    proc = python_c(code, AFINE_WEIGHTS=str(released), AFINE_OFFLINE="1")
    assert proc.returncode == 1 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"afine.errors.AfineError: {released}: the released A-FINE weights are not there and downloads "
                    f"are off (AFINE_OFFLINE=1); download {server_url()} and put it at {released}, or pass the file: "
                    'load_afine("afine.pth")')
    assert proc.stderr.count("Traceback") == 1 and "During handling" not in proc.stderr
    assert "download.py" not in proc.stderr  # raised by load_afine itself: the traceback ends at the call
    released.parent.mkdir()
    shutil.copy(weights, released)  # the released weights in the cache
    proc = python_c(code, AFINE_WEIGHTS=str(released), AFINE_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = load_afine(weights)(afine.load_image(dis)[None], afine.load_image(ref)[None])["afine_all"].item()
    assert float(proc.stdout) == expected and proc.stderr == ""


# ---------------------------------------------------------------------------------------- the order of arguments


def test_weights_first_and_the_clip_by_keyword(checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning for the new order
        merged = load_afine(checkpoints["afine"])
        heads = load_afine(checkpoints["heads"], clip=checkpoints["clip_plain"])
        lean = load_afine(checkpoints["afine"], require=("natural",), text_tower=False)
    assert same(merged, heads) and same(merged, lean)
    with pytest.raises(AfineError, match="holds no fine-tuned CLIP"):
        load_afine(checkpoints["heads"])


@pytest.mark.parametrize("call, new", [
    (lambda p: load_afine(None, p["afine"]), lambda p: load_afine(p["afine"])),
    (lambda p: load_afine(p["clip_plain"], p["heads"]), lambda p: load_afine(p["heads"], clip=p["clip_plain"])),
    (lambda p: load_afine(p["clip_ts"], p["heads"], ("natural",)),
     lambda p: load_afine(p["heads"], clip=p["clip_ts"], require=("natural",))),
    (lambda p: load_afine(None, p["heads"], ("fidelity",), p["clip_plain"]),
     lambda p: load_afine(p["heads"], require=("fidelity",), default_clip=p["clip_plain"])),
    (lambda p: load_afine(None, p["afine"], text_tower=True), lambda p: load_afine(p["afine"], text_tower=True)),
])
def test_the_old_order_still_works_with_a_deprecation_warning(checkpoints, call, new):
    with pytest.warns(DeprecationWarning, match=r"load_afine\(clip, weights\) is deprecated.*load_afine\(weights, "
                                                r"clip=clip\)") as record:
        old = call(checkpoints)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    assert same(old, new(checkpoints)) and old.clip.text_tower == new(checkpoints).clip.text_tower


def test_the_old_order_with_a_clashing_keyword_is_a_type_error(checkpoints):
    with pytest.raises(TypeError, match="multiple values for 'clip'"):
        load_afine(checkpoints["clip_plain"], checkpoints["heads"], clip=checkpoints["clip_plain"])
    with pytest.raises(TypeError, match="multiple values for 'require'"):
        load_afine(None, checkpoints["afine"], ("natural",), require=("fidelity",))
    with pytest.raises(TypeError, match="at most 5 positional arguments"):
        load_afine(None, checkpoints["afine"], ("natural",), None, False, 1)


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("source", ["afine", "folder", "heads+clip_plain", "heads+clip_ts"])
def test_a_model_loaded_for_scoring_exports_whole(checkpoints, tmp_path, source):
    weights, _, clip = source.partition("+")
    model = load_afine(checkpoints[weights], clip=checkpoints[clip] if clip else None)
    assert not model.clip.text_tower  # loaded for scoring: no text tower in memory
    save_afine(tmp_path / "afine.pth", model.parts())  # the README's export example
    whole = load_afine(checkpoints[weights], clip=checkpoints[clip] if clip else None, text_tower=True)
    save_afine(tmp_path / "whole.pth", whole.parts())
    exported, expected = read_afine_parts(tmp_path / "afine.pth")[0], read_afine_parts(tmp_path / "whole.pth")[0]
    assert exported.keys() == expected.keys() == set(PART_FILES)
    for part in PART_FILES:
        assert exported[part].keys() == expected[part].keys(), part
        assert all(torch.equal(exported[part][k], expected[part][k]) for k in expected[part]), part
    assert same(load_afine(tmp_path / "afine.pth"), model)


def test_exporting_after_the_file_changed_is_one_error_line(checkpoints, tmp_path):
    path = tmp_path / "afine.pth"
    shutil.copy(checkpoints["afine"], path)
    model = load_afine(path)
    save_afine(path, random_afine(tiny_clip(seed=9), seed=9).parts())  # another model at the same path
    with pytest.raises(AfineError) as info:
        model.parts()
    assert str(info.value) == (f"{path}: changed or gone since the model was loaded from it, so its CLIP text tower "
                               "may not match the model's image tower; load the model with text_tower=True to export "
                               "it")
    path.unlink()
    with pytest.raises(AfineError, match="changed or gone"):
        model.parts()
    with pytest.raises(AfineError, match=r"holds no CLIP text tower.*text_tower=True"):
        AFINE(model.clip).parts()  # built in memory: no file to take a text tower from
