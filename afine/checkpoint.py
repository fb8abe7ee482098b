"""Checkpoint files: the merged `afine.pth`, BasicSR-style per-network files, CLIP files.

The merged file is what pyiqa and the official inference script load (docs/training.md, "Export for pyiqa and the
official code").

Every read error is an AfineError naming the file (and the keys at fault); every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .clip import ARCHIVE_SCALARS, CLIP
from .errors import AfineError, warn
from .torchscript import is_torchscript_archive, read_torchscript_state_dict

# Parts of the merged file, in the official order, and the per-network file holding each.
PART_FILES = {
    "finetuned_clip": "clip_model.pth",
    "natural": "net_qhead.pth",
    "fidelity": "net_dhead.pth",
    "fidelity_scale": "net_scale_fr.pth",
    "natural_scale": "net_scale_nr.pth",
    "adapter": "net_finalscore.pth",
}


def atomic_save(obj, path: str | Path) -> None:
    """torch.save through a temp file, fsync, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def torch_load(path: str | Path, unread: Callable[[tuple], bool] | None = None):
    """torch.load on CPU with weights_only (tensors and plain containers only: nothing in the file is run), every
    tensor in this process's own memory: a file rewritten while a model loaded from it runs can neither change its
    numbers nor crash it (a memory-mapped file does both: a SIGBUS when it shrinks).

    Files in torch's zip format (every torch.save since PyTorch 1.6) are read in two steps: their structure (keys,
    shapes, dtypes, where each tensor's bytes lie), then the bytes of each tensor. `unread(keys)`, given the keys
    leading to a tensor (("finetuned_clip", "token_embedding.weight")), leaves those it names unread: they stay
    on the meta device, shapes only (scoring never reads CLIP's text tower). A file that changes while it is read,
    or a missing or unreadable one, is an AfineError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise AfineError(f"{path}: file not found")
    if is_torchscript_archive(path):  # torch.load would hand it to torch.jit.load
        raise AfineError(f"{path}: a TorchScript archive, expected a plain torch.save file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AfineError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    with f:
        stamp = file_stamp(os.fstat(f.fileno()))
        try:
            obj, error = read_checkpoint(f, unread), None
        except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
            obj, error = None, e
        if file_stamp(os.fstat(f.fileno())) != stamp:
            raise AfineError(f"{path}: changed while being read (is something writing it?); run again once it is "
                             "written") from None
    if error is not None:
        raise AfineError(f"{path}: cannot read checkpoint ({load_error_reason(error)})") from None
    return obj


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What writing or replacing a file changes: its inode, size, modification and change times."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_checkpoint(f, unread: Callable[[tuple], bool] | None):
    """torch_load's reading: a zip-format file's structure on the meta device, then each tensor's bytes (those
    `unread` leaves out excepted) read from the file into memory of our own; other files read whole by torch.load."""
    with warnings.catch_warnings():  # its note on a pickle protocol would print before our one error line
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        if not native_zip(f):  # the legacy format, or a zip written on a machine of the other byte order
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
        f.seek(0)
        obj = torch.load(f, map_location="meta", weights_only=True)
    storages: dict[int, torch.Tensor] = {}

    def read(tensor: torch.Tensor, keys: tuple) -> torch.Tensor:
        if not tensor.is_meta or (unread is not None and unread(keys)):
            return tensor
        storage = tensor.untyped_storage()
        offset, size = storage._checkpoint_offset, storage.nbytes()  # where torch.load found the tensor's bytes
        if offset not in storages:  # tensors viewing one storage share it, as torch.load gives them
            data = torch.empty(size, dtype=torch.uint8)
            f.seek(offset)
            if size and f.readinto(memoryview(data.numpy())) != size:
                raise EOFError(f"the file ends inside the bytes of tensor {keys[-1]!r}")
            storages[offset] = data
        return storages[offset].view(tensor.dtype).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    if any(getattr(t.untyped_storage(), "_checkpoint_offset", None) is None for t in tensors_in(obj)):
        f.seek(0)  # a torch that does not say where the bytes lie: read the whole file
        return torch.load(f, map_location="cpu", weights_only=True)
    return map_tensors(obj, read)


def native_zip(f) -> bool:
    """A zip file whose tensor bytes are in this machine's byte order (torch writes it in a `byteorder` record;
    files without one are read as native, as torch.load does)."""
    try:
        with zipfile.ZipFile(f) as archive:  # a file object: closing the archive leaves it open
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/byteorder")]
            return all(archive.read(n).decode(errors="replace").strip() == sys.byteorder for n in names)
    except zipfile.BadZipFile:
        return False


def tensors_in(obj) -> list[torch.Tensor]:
    found = []
    map_tensors(obj, lambda t, keys: found.append(t) or t)
    return found


def map_tensors(obj, fn: Callable[[torch.Tensor, tuple], torch.Tensor], keys: tuple = ()):
    """`obj` with each tensor in its dicts, lists and tuples replaced by fn(tensor, keys leading to it)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, keys)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = map_tensors(v, fn, (*keys, k))
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, (*keys, i)) for i, v in enumerate(obj))
    return obj


def is_text_tower(key) -> bool:
    """A CLIP state-dict key outside the image tower (`visual.`): scoring never reads these tensors."""
    return not str(key).removeprefix("module.").startswith("visual.")


def left_unread(towers: str) -> Callable[[str], bool] | None:
    """Which CLIP keys a read of `towers` leaves unread: "image" (scoring) leaves the text tower's, "text" (exporting
    a model loaded for scoring) the image tower's, "both" none."""
    if towers not in ("both", "image", "text"):
        raise ValueError(f"towers must be 'both', 'image' or 'text', got {towers!r}")
    if towers == "both":
        return None
    return is_text_tower if towers == "image" else lambda key: not is_text_tower(key)


def load_error_reason(error: Exception) -> str:
    """torch.load's failure as one line, without its advice to retry with weights_only off (that runs the file)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Weights only load failed")]
    if useful:
        return useful[0]
    return "it holds more than tensors and plain containers" if lines else type(error).__name__


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP's `module.` prefix from every key, if present."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def state_dict_for_saving(module_or_state: nn.Module | dict) -> dict[str, torch.Tensor]:
    """A plain CPU state dict without `module.` prefixes, tensors contiguous and detached."""
    state = module_or_state
    if isinstance(state, nn.Module):
        state = getattr(state, "module", state).state_dict()  # unwrap DistributedDataParallel
    return {k: v.detach().cpu().contiguous() for k, v in strip_module_prefix(state).items()}


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with one clear error naming the source and the keys at fault; weights holding
    NaN or infinity are refused (they would score NaN, or train from it, without a word)."""
    check_keys(module, state_dict, source)
    check_finite(state_dict, source)
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


def check_keys(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """AfineError naming the source and the keys at fault unless `state_dict` has exactly the module's keys and
    shapes (the module may be on the meta device: only shapes are compared)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise AfineError(f"{source}: wrong keys: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs expected {tuple(v.shape)}" for k, v in own.items()
             if tuple(state_dict[k].shape) != tuple(v.shape)]
    if wrong:
        raise AfineError(f"{source}: wrong shapes: {', '.join(wrong[:4])}")


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """AfineError naming the source and the first tensor holding NaN or infinity.

    One reduction per tensor and no boolean copy: a finite sum means every value is finite; only a sum that is not
    (a NaN or an infinity in the tensor, or finite values whose sum overflows) takes the exact per-value check.
    """
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not math.isfinite(v.sum())
                and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise AfineError(f"{source}: tensor {bad!r} holds NaN or infinity")


def read_network_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A BasicSR-style per-network file `{'params': state_dict}` (a bare state dict is accepted too)."""
    obj = torch_load(path)
    if isinstance(obj, dict) and "params" in obj and isinstance(obj["params"], dict):
        obj = obj["params"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AfineError(f"{path}: expected {{'params': state_dict}}")
    return strip_module_prefix(obj)


def save_network_file(path: str | Path, module_or_state: nn.Module | dict) -> None:
    """Write `{'params': state_dict}` atomically, as BasicSR and the official trainer do."""
    atomic_save({"params": state_dict_for_saving(module_or_state)}, path)


def read_afine_parts(path: str | Path, towers: str = "both") -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                     dict[str, str]]:
    """The A-FINE parts from a merged `afine.pth` or a folder of per-network files.

    Returns (parts, sources): part name -> state dict, and part name -> where it came from (for errors).
    A folder may hold only some parts (a stage-1 or stage-2 run); callers check what they need.
    `towers` "image" (scoring) leaves the fine-tuned CLIP's text tower unread (meta tensors, shapes only), "text"
    its image tower.
    """
    path = Path(path)
    if path.is_dir():
        parts, sources = read_run_folder(path, {}, {}, towers)
        if not parts:
            raise AfineError(f"{path}: no A-FINE checkpoint files ({', '.join(PART_FILES.values())}) in this folder")
        return parts, sources
    skip = left_unread(towers)
    obj = torch_load(path, None if skip is None else
                     lambda keys: len(keys) == 2 and keys[0] == "finetuned_clip" and skip(keys[1]))
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise AfineError(f"{path}: not a merged A-FINE checkpoint (expected a dict of state dicts)")
    missing = [p for p in PART_FILES if p not in obj]
    unexpected = [k for k in obj if k not in PART_FILES]
    if missing or unexpected:
        raise AfineError(f"{path}: wrong parts: missing {missing}, unexpected {unexpected}")
    return {p: strip_module_prefix(obj[p]) for p in PART_FILES}, {p: f"{path}[{p}]" for p in PART_FILES}


def read_run_folder(folder: Path, digests: dict[str, str], read: dict[Path, tuple],
                    towers: str = "both") -> tuple[dict, dict]:
    """The parts of a folder of per-network files and, for those it lacks, of the earlier stages' run folders its
    config.json names, each checked against its built_on.json. `digests` and `read` (folder -> its parts) are
    shared by one load, so no file is hashed or read twice."""
    key = folder.resolve()
    if key in read:
        return read[key]
    parts, sources = {}, {}
    for part, name in PART_FILES.items():
        file = folder / name
        if file.is_file():
            state = (read_network_file(file) if part != "finetuned_clip"
                     else read_clip_file(file, plain=True, towers=towers))
            parts[part], sources[part] = state, str(file)
    # the earlier stages' files combined with this folder's own stage (also those copied into the folder)
    taken = [Path(sources[part]) for part in parts if PART_FILES[part] in trained_on(folder)]
    for earlier in earlier_runs(folder):
        more, more_sources = read_run_folder(earlier, digests, read, towers)
        for part in more:
            if part not in parts:
                parts[part], sources[part] = more[part], more_sources[part]
                taken.append(Path(more_sources[part]))
    check_built_on(folder, taken, digests)
    read[key] = parts, sources
    return parts, sources


def weight_files(path: str | Path) -> list[Path]:
    """The files read_afine_parts reads for `path`: the file itself, or a run folder's network files, config.json
    and built_on.json and those of the earlier stages it names (for commands that must not write over them)."""
    folders, files = [Path(path)], []
    while folders:
        folder = folders.pop()
        if not folder.is_dir():
            files.append(folder)
            continue
        files += [folder / name for name in (*PART_FILES.values(), "config.json", "built_on.json")]
        folders += [earlier for earlier in earlier_runs(folder) if earlier / "config.json" not in files]
    return files


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[Path], known: dict[str, str] | None = None) -> dict[str, str]:
    """{absolute path: SHA-256} of the files (earlier stages' networks); those already in `known` (which gets
    the new ones) are not hashed again: a CLIP file is hundreds of MB."""
    known = {} if known is None else known
    for path in paths:
        if str(Path(path).resolve()) not in known:
            known[str(Path(path).resolve())] = sha256(path)
    return {str(Path(p).resolve()): known[str(Path(p).resolve())] for p in paths}


# The earlier stages' files a stage is trained on (its built_on.json records their SHA-256), by a file that only
# that stage's run folder holds: stage 3 (net_finalscore.pth), stage 2 (net_dhead.pth); stage 1 on none.
TRAINED_ON = (("net_finalscore.pth", ("clip_model.pth", "net_qhead.pth", "net_dhead.pth")),
              ("net_dhead.pth", ("clip_model.pth",)))
SHA256 = re.compile(r"[0-9a-f]{64}")


def trained_on(run_dir: Path) -> tuple[str, ...]:
    """Names of the earlier stages' files the stage whose files `run_dir` holds was trained on."""
    return next((names for own, names in TRAINED_ON if (run_dir / own).is_file()), ())


def digests_by_name(record, source: str) -> dict[str, str]:
    """A built_on record {path: SHA-256} as {file name: SHA-256}. Paths are relative to the run folder (or absolute,
    as runs recorded them before), and only the name counts: the files are compared by content, wherever they are.
    A record that is not such a mapping is an AfineError naming `source`."""
    if not isinstance(record, dict):
        raise AfineError(f"{source}: expected a JSON object {{file: SHA-256}}, found {type(record).__name__}")
    names = {}
    for path, digest in record.items():
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise AfineError(f"{source}: {path!r}: expected a SHA-256 (64 hex digits), found {digest!r}")
        if names.setdefault(Path(path).name, digest) != digest:
            raise AfineError(f"{source}: names two different {Path(path).name}")
    return names


def read_built_on(run_dir: Path) -> dict[str, str] | None:
    """{file name: SHA-256} of the earlier stages' files a training run was trained on, from its built_on.json;
    None for a run that has none (made before runs recorded it, or a plain folder of network files). A record
    that is not a file, not JSON, or lacks a file the run's stage is trained on is an AfineError naming it."""
    record = run_dir / "built_on.json"
    if not os.path.lexists(record):
        return None
    if not record.is_file():
        raise AfineError(f"{record}: not a file; expected the record of the earlier stages' files the run was "
                         "trained on")
    try:
        names = digests_by_name(json.loads(record.read_text()), str(record))
    except (OSError, ValueError) as e:
        raise AfineError(f"{record}: cannot read ({e})") from None
    missing = [name for name in trained_on(run_dir) if name not in names]
    if missing:
        raise AfineError(f"{record}: names no {', '.join(missing)} (the run's stage is trained on "
                         f"{', '.join(trained_on(run_dir))}); the record is damaged: retrain this stage")
    return names


def check_built_on(run_dir: Path, files: list[Path], digests: dict[str, str] | None = None) -> None:
    """A training run's built_on.json holds the SHA-256 of the earlier stages' files it was trained on. `files`
    are the earlier stages' files about to be combined with it; every file the record names must be among them
    (matched by name: clip_model.pth, net_qhead.pth, net_dhead.pth, one each) with the recorded digest. So a file
    changed since, a config.json or stage folder pointing to another run, or one naming none (a CLIP then taken
    from elsewhere) is refused, while a moved copy of the runs loads. A run folder without the record (made before
    runs kept one) is loaded with a warning naming it. `digests` (absolute path -> SHA-256) spares hashing a file
    twice."""
    recorded = read_built_on(run_dir)
    if recorded is None:
        if (run_dir / "config.json").is_file() and trained_on(run_dir):
            warn(f"{run_dir}: no built_on.json (a run made before runs recorded it): the earlier stages' files it is "
                 "combined with are not checked")
        return
    by_name = {Path(file).name: Path(file) for file in files}
    for name, digest in recorded.items():
        file = by_name.get(name)
        if file is None:
            raise AfineError(f"{run_dir} was trained on a {name} (its built_on.json), but its config.json names no "
                             f"run folder holding one; restore the stage folder keys (stage1_dir, stage2_dir) it "
                             "was trained with")
        if file_digests([file], digests)[str(file.resolve())] != digest:
            raise AfineError(f"{run_dir} was trained on another {name} than {file} (its built_on.json records "
                             "another SHA-256: the file changed since, or a folder now points to another run); "
                             "retrain this stage or point to the run folder it was trained on")


EARLIER_RUNS = ("stage2_dir", "stage1_dir")  # config keys naming the earlier stages' run folders


def earlier_run_path(run_dir: Path, value: str) -> Path:
    """The folder a run's config.json names: relative to the run folder (as runs record it, so a runs tree moved
    whole still finds its stages), or absolute (as runs recorded it before); a relative name that is not a folder
    there is taken from the working folder (a config.json edited by hand)."""
    folder = Path(value)
    return folder if folder.is_absolute() or not (run_dir / folder).is_dir() else run_dir / folder


def earlier_runs(run_dir: Path) -> list[Path]:
    """Run folders named by a training run's `config.json` (`stage2_dir`, then `stage1_dir`), if any."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        return []
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise AfineError(f"{config_file}: cannot read run config ({e})") from None
    runs = []
    for key in EARLIER_RUNS:
        if isinstance(config, dict) and config.get(key):
            if not isinstance(config[key], str):
                raise AfineError(f"{config_file}: {key} {config[key]!r} is not a folder")
            folder = earlier_run_path(run_dir, config[key])
            if not folder.is_dir():
                raise AfineError(f"{config_file}: {key} {config[key]!r} is not a folder")
            runs.append(folder)
    return runs


def save_afine(path: str | Path, parts: dict[str, nn.Module | dict]) -> None:
    """Write the merged `afine.pth` with exactly the six official parts, atomically."""
    missing = [p for p in PART_FILES if p not in parts]
    if missing:
        raise AfineError(f"{path}: cannot write afine.pth, parts missing: {missing}")
    atomic_save({p: state_dict_for_saving(parts[p]) for p in PART_FILES}, path)


def read_clip_file(path: str | Path, plain: bool = False, towers: str = "both") -> dict[str, torch.Tensor]:
    """A CLIP state dict from OpenAI's TorchScript archive or a plain state-dict file (`clip_model.pth`).

    Neither is ever run: archives go through the restricted reader of afine/torchscript.py, plain files through
    torch.load with weights_only; `plain=True` (a run folder's clip_model.pth) accepts only the latter.
    Archive metadata entries (input_resolution, ...) are dropped. `towers` "image" (scoring) leaves a plain file's
    text tower unread (meta tensors, shapes only), "text" its image tower; an archive is read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise AfineError(f"{path}: CLIP checkpoint not found")
    archive = not plain and is_torchscript_archive(path)
    skip = left_unread(towers)
    state_dict = (read_torchscript_state_dict(path) if archive
                  else torch_load(path, None if skip is None else lambda keys: len(keys) == 1 and skip(keys[0])))
    if isinstance(state_dict, dict):
        state_dict = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALARS}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AfineError(f"{path}: not a CLIP checkpoint (expected a state dict of tensors, "
                         f"found {type(state_dict).__name__})")
    return strip_module_prefix(state_dict)


def read_text_tower(file: str | Path, kind: str, stamp: tuple) -> dict[str, torch.Tensor]:
    """The text tower of the CLIP in `file`, for a model loaded for scoring (which never read it) to be exported
    whole. `kind`: "merged" (an afine.pth's finetuned_clip), "plain" (a run folder's clip_model.pth) or "clip"
    (a CLIP checkpoint, either format). The file must be the one the model was loaded from, unchanged since
    (`stamp`, its file_stamp then): else its text tower need not match the image tower the model holds.
    """
    file = Path(file)

    def check() -> None:
        try:
            same = file_stamp(os.stat(file)) == stamp
        except OSError:
            same = False
        if not same:
            raise AfineError(f"{file}: changed or gone since the model was loaded from it, so its CLIP text tower may "
                             "not match the model's image tower; load the model with text_tower=True to export it")

    check()
    if kind == "merged":
        state = read_afine_parts(file, towers="text")[0]["finetuned_clip"]
    else:
        state = read_clip_file(file, plain=kind == "plain", towers="text")
    check()
    return {k: v for k, v in state.items() if is_text_tower(k) and k not in ARCHIVE_SCALARS}


# `clip: "random-tiny"` in stage 1: a small random CLIP in OpenAI's layout (demo and tests; no download).
RANDOM_TINY = "random-tiny"
TINY_CLIP = dict(embed_dim=64, vision_width=64, vision_layers=3, vision_patch_size=16, grid_size=4,
                 context_length=8, vocab_size=64, transformer_width=64, transformer_layers=1)


def clip_from_spec(spec: str, seed: int = 0) -> CLIP:
    """OpenAI's ViT-B-32.pt, a plain CLIP state-dict file, or "random-tiny" (initialised from `seed`)."""
    if spec == RANDOM_TINY:
        torch.manual_seed(seed)
        return CLIP(**TINY_CLIP)
    return build_clip(read_clip_file(spec), spec)


def run_file(folder: str | Path, name: str, stage: int) -> Path:
    """A file of an earlier stage's run folder; a clear error if it is not there."""
    path = Path(folder) / name
    if not path.is_file():
        raise AfineError(f"{folder}: no {name}; expected a stage-{stage} run folder")
    return path


def build_clip(state_dict: dict[str, torch.Tensor], source: str, text_tower: bool = True) -> CLIP:
    """A float32 CLIP whose architecture follows the state dict's shapes (archive metadata entries ignored).

    Every key of the full CLIP is checked strictly (the text tower's may be meta tensors: only their shapes are
    needed). The model is built on the meta device and handed the tensors (no random initialisation to overwrite).
    With the text tower (training, export) every tensor is copied; without it (scoring) the text tower's tensors
    are dropped and float32 image-tower tensors are used as they are (torch_load read them into memory of our own).
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in ARCHIVE_SCALARS}
    try:
        config = CLIP.config_from_state_dict(state_dict)
    except ValueError as e:
        raise AfineError(f"{source}: {e}") from None
    with torch.device("meta"):
        full = CLIP(**config)
        model = full if text_tower else CLIP(**config, text_tower=False)
    check_keys(full, state_dict, source)
    keys = model.state_dict().keys()
    used = {k: v for k, v in state_dict.items() if k in keys}
    check_finite(used, source)
    model.load_state_dict({k: v.to(torch.float32, copy=text_tower) for k, v in used.items()}, strict=True, assign=True)
    return model
