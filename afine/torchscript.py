"""The tensors of a TorchScript archive (OpenAI's released `ViT-B-32.pt`), read without running any of its code.

`torch.jit.load` compiles and runs the Python-like code an archive carries, so a crafted file could do anything.
Here only the module tree in `<name>/data.pkl` is unpickled, through an allow-list: module objects become inert
placeholders holding their attributes, tensors are rebuilt from the raw storages `<name>/data/<key>`, and any
other global the pickle names is refused. The tensor attributes, by attribute path, give the same state dict
(keys, order, dtypes) as `torch.jit.load(path).state_dict()` for traced modules such as OpenAI's.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import AfineError

# The storage types a TorchScript state pickle names, and the dtype of each.
STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding compiled code (`<name>/code/`, `<name>/constants.pkl`), as OpenAI's CLIP files are."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class Refused(Exception):
    """The pickle names something a TorchScript module's state never needs."""


class ScriptModule:
    """Placeholder for a `__torch__.*` module object: keeps its attribute dict, has no behaviour."""

    def __init__(self, *args, **kwargs):
        raise Refused("its data.pkl calls a module class")

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise Refused(f"its data.pkl gives a module a {type(state).__name__} state, not a dict")
        self.attributes = state


class StorageType:
    """Stands for `torch.<Type>Storage` inside the pickle: only its dtype is used."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """Our stand-in for `torch._utils._rebuild_tensor_v2`: a view of a storage, bounds checked."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise Refused("its data.pkl builds a tensor from something that is not a storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))):
        raise Refused(f"its data.pkl has a tensor with invalid geometry (offset {offset!r}, size {size!r}, "
                      f"stride {stride!r})")
    if hooks:
        raise Refused("its data.pkl has a tensor with backward hooks")
    if all(size):
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > storage.numel():
            raise Refused(f"its data.pkl has a tensor reaching element {end} of a storage of {storage.numel()}")
    return storage.as_strided(size, stride, offset)


class StateUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl`, allowing only module placeholders, tensors and their storages."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__.") or module == "__torch__":
            return ScriptModule
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise Refused(f"its data.pkl names the global {module}.{name}, which module state never needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise Refused(f"its data.pkl holds an unknown persistent id {str(pid)[:80]}")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = self.read_storage(key, kind.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != kind.dtype or storage.numel() != numel:
            raise Refused(f"its storage {key} is used as both {storage.dtype} x {storage.numel()} and "
                          f"{kind.dtype} x {numel}")
        return storage

    def read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise Refused(f"its storage {name} is missing") from None
        expected = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size != expected:
            raise Refused(f"its storage {name} holds {info.file_size} bytes, expected {expected} ({numel} x {dtype})")
        data = bytearray(self.archive.read(name))
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def collect_tensors(root, prefix: str = "", out: dict | None = None, seen: set | None = None) -> dict:
    """Tensor attributes of a placeholder tree by dotted path, in attribute order (state_dict order)."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(root) in seen:
        raise Refused("its module tree contains a cycle")
    seen.add(id(root))
    for name, value in getattr(root, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()  # a plain tensor: no hooks or grad flags from the file
        elif isinstance(value, ScriptModule):
            collect_tensors(value, f"{prefix}{name}.", out, seen)
    return out


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive's top module (dtypes kept), without executing anything.

    Raises AfineError naming the file: not a readable archive, a refused global, or storages that do not fit.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise Refused(f"it holds {len(pickles)} <name>/data.pkl files, expected one")
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
                raise Refused("its storages are not little-endian")
            root = StateUnpickler(archive.read(pickles[0]), archive, prefix).load()
            if not isinstance(root, ScriptModule):
                raise Refused(f"its data.pkl holds a {type(root).__name__}, not a module")
            state = collect_tensors(root)
    except Refused as e:
        raise AfineError(f"{path}: TorchScript archive refused, {e} (nothing in it was run)") from None
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as e:
        raise AfineError(f"{path}: cannot read TorchScript archive ({first_line(e)})") from None
    return state


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
