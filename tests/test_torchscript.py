"""CLIP checkpoint files are read, never run: the restricted TorchScript reader and weights-only plain files."""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import shutil
import subprocess
import warnings
import zipfile

import pytest
import torch
from PIL import Image

from afine.checkpoint import build_clip, read_afine_parts, read_clip_file, torch_load
from afine.errors import AfineError
from afine.model import AFINE, TERMS, load_afine
from afine.torchscript import (
    Refused,
    ScriptModule,
    StateUnpickler,
    is_torchscript_archive,
    read_torchscript_state_dict,
    rebuild_tensor,
)
from tests.tiny import random_afine, tiny_clip, write_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = write_checkpoints(tmp_path_factory.mktemp("ts"), random_afine(tiny_clip(seed=5)))
    paths["heads"] = paths["folder"].parent / "heads"  # the head files without a fine-tuned CLIP
    shutil.copytree(paths["folder"], paths["heads"])
    (paths["heads"] / "clip_model.pth").unlink()
    return paths


def jit_state_dict(path) -> dict[str, torch.Tensor]:
    """What torch.jit.load gives (it runs the archive: only for our own test archive)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


class Call:
    """Pickles as a call of `function(*args)`: what a crafted file would run when unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def rewrite_archive(source, target, replace: dict[str, bytes]) -> None:
    """Copy a zip, replacing the named entries' bytes."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))


def data_pkl_name(path) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(n for n in archive.namelist() if n.endswith("/data.pkl"))


def test_archive_reads_to_the_same_state_dict_as_torch_jit(checkpoints):
    path = checkpoints["clip_ts"]
    assert is_torchscript_archive(path) and not is_torchscript_archive(checkpoints["clip_plain"])
    ours, theirs = read_torchscript_state_dict(path), jit_state_dict(path)
    assert list(ours) == list(theirs)
    assert "visual.conv1.weight" in ours and "input_resolution" in ours
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["visual.conv1.weight"].dtype == torch.float16


def test_archive_scores_equal_scores_from_torch_jit_weights(checkpoints):
    """The model with the archive as CLIP scores exactly as one built from torch.jit.load's state dict."""
    ours = load_afine(checkpoints["heads"], clip=checkpoints["clip_ts"])
    parts, sources = read_afine_parts(checkpoints["heads"])
    theirs = AFINE(build_clip(jit_state_dict(checkpoints["clip_ts"]), "jit"))
    theirs.load_parts(parts, sources)
    g = torch.Generator().manual_seed(0)
    dis, ref = torch.rand(3, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        a, b = ours(dis, ref), theirs.eval()(dis, ref)
    for term in TERMS:
        assert torch.equal(a[term], b[term]), term


@pytest.mark.parametrize("call", ["system", "open"])
def test_crafted_archive_is_refused_and_nothing_runs(checkpoints, tmp_path, call):
    marker = tmp_path / "pwned"
    payload = Call(os.system, f"touch {marker}") if call == "system" else Call(builtins.open, str(marker), "w")
    crafted = tmp_path / "ViT-B-32.pt"
    rewrite_archive(checkpoints["clip_ts"], crafted, {data_pkl_name(checkpoints["clip_ts"]): pickle.dumps(payload)})
    assert is_torchscript_archive(crafted)
    with pytest.raises(AfineError) as info:
        read_clip_file(crafted)
    message = str(info.value)
    assert "\n" not in message and str(crafted) in message
    assert "global" in message and f".{call}," in message  # names the refused global, e.g. posix.system
    assert not marker.exists()
    with pytest.raises(AfineError):  # the model loader goes the same way
        load_afine(checkpoints["heads"], clip=crafted)
    assert not marker.exists()


def test_module_state_holding_a_call_is_refused(checkpoints, tmp_path):
    """A call hidden deep inside an otherwise genuine module tree is refused just the same."""
    name = data_pkl_name(checkpoints["clip_ts"])
    with zipfile.ZipFile(checkpoints["clip_ts"]) as archive:
        data = archive.read(name)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Call(os.system, f"touch {marker}"), protocol=2)[2:-1]  # the opcodes, without PROTO/STOP
    key = b"X\x08\x00\x00\x00training"  # BINUNICODE 'training' in the top module's attribute dict
    assert key in data
    crafted = tmp_path / "deep.pt"
    rewrite_archive(checkpoints["clip_ts"], crafted, {name: data.replace(key, b"X\x04\x00\x00\x00evil" + evil + key,
                                                                         1)})
    with pytest.raises(AfineError, match="posix.system"):
        read_clip_file(crafted)
    assert not marker.exists()


def test_storage_of_the_wrong_size_is_refused(checkpoints, tmp_path):
    name = data_pkl_name(checkpoints["clip_ts"])
    storage = name.replace("data.pkl", "data/0")
    crafted = tmp_path / "short.pt"
    rewrite_archive(checkpoints["clip_ts"], crafted, {storage: b"\x00" * 6})
    with pytest.raises(AfineError, match=r"short\.pt: .*storage .*data/0 holds 6 bytes"):
        read_clip_file(crafted)


def test_plain_pickle_with_code_is_refused_without_unsafe_advice(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "clip_model.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1), "x": Call(os.system, f"touch {marker}")}, path)
    for read in (read_clip_file, torch_load):
        with pytest.raises(AfineError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path}: cannot read checkpoint (") and "posix.system" in message
        assert "\n" not in message and "weights_only" not in message
    assert not marker.exists()


def test_clip_reader_rejects_non_state_dicts(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(AfineError, match="not a CLIP checkpoint"):
        read_clip_file(path)



def test_run_folder_clip_must_be_a_plain_state_dict(checkpoints, tmp_path):
    """A run folder's clip_model.pth is read with torch.load(weights_only=True) only, never as an archive."""
    folder = tmp_path / "run"
    shutil.copytree(checkpoints["heads"], folder)
    shutil.copy(checkpoints["clip_ts"], folder / "clip_model.pth")
    with pytest.raises(AfineError, match=r"clip_model\.pth: a TorchScript archive, expected a plain torch.save file"):
        read_afine_parts(folder)


@pytest.mark.parametrize("name", ["eval", "exec", "getattr", "__import__", "Popen"])
def test_every_dangerous_global_is_refused(checkpoints, tmp_path, name):
    """A module tree needs module classes, tensors, storages and OrderedDict: anything else is refused unrun."""
    marker = str(tmp_path / "pwned")
    payload = {"eval": Call(builtins.eval, f"open({marker!r}, 'w')"),
               "exec": Call(builtins.exec, f"open({marker!r}, 'w')"),
               "getattr": Call(builtins.getattr, marker, "upper"),
               "__import__": Call(builtins.__import__, "subprocess"),
               "Popen": Call(subprocess.Popen, ["touch", marker])}[name]
    crafted = tmp_path / "ViT-B-32.pt"
    rewrite_archive(checkpoints["clip_ts"], crafted, {data_pkl_name(checkpoints["clip_ts"]): pickle.dumps(payload)})
    with pytest.raises(AfineError, match=rf"names the global \w+\.{name},"):
        read_clip_file(crafted)
    assert not os.path.exists(marker)


def test_the_allow_list_is_the_patterns_a_module_tree_needs_and_nothing_else():
    unpickler = StateUnpickler(b"", zipfile.ZipFile(io.BytesIO(), "w"), "archive/")
    assert unpickler.find_class("__torch__.model.CLIP", "CLIP") is ScriptModule
    assert unpickler.find_class("torch._utils", "_rebuild_tensor_v2") is rebuild_tensor
    assert unpickler.find_class("torch", "HalfStorage").dtype == torch.float16
    assert unpickler.find_class("collections", "OrderedDict") is collections.OrderedDict
    refused = [("builtins", name) for name in dir(builtins)] + [
        ("torch", "load"), ("torch", "Tensor"), ("torch", "HalfStorageX"), ("torch._utils", "_rebuild_parameter"),
        ("torch.jit", "load"), ("collections", "defaultdict"), ("os", "system"), ("posix", "system"),
        ("subprocess", "Popen"), ("pickle", "loads"), ("_codecs", "encode"), ("torch_", "FloatStorage"),
        ("__torch", "x"), ("numpy.core.multiarray", "_reconstruct")]
    allowed = [(m, n) for m, n in refused if not raises_refused(unpickler, m, n)]
    assert allowed == []


def raises_refused(unpickler, module: str, name: str) -> bool:
    try:
        unpickler.find_class(module, name)
    except Refused:
        return True
    return False


def test_a_plain_pickle_is_one_error_line_without_torch_warnings(tmp_path, capsys):
    """pickle.dump's protocol 4 makes torch.load warn in two lines before failing: only our line is shown."""
    from afine.__main__ import main

    path = tmp_path / "afine.pth"
    with open(path, "wb") as f:
        pickle.dump({"natural": {"w": [1.0]}}, f, protocol=4)
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as on a first run, whatever earlier tests have shown
        code = main(["score", "--weights", str(path), str(tmp_path / "a.png"), str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path}: cannot read checkpoint (") and err.count("\n") == 1, err
