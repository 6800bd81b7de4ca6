"""Restricted reader for PyTorch checkpoints (`torch.save` zip and legacy formats) and `.safetensors`.

Nothing here imports torch. The pickle inside a `.pth` file is loaded by an unpickler that only resolves the
few globals a state dict needs (tensor rebuild functions, typed storage classes, `OrderedDict`); any other
global, e.g. `os.system`, is refused before it can run. Tensors come back as numpy arrays (bfloat16 as
`ml_dtypes.bfloat16`), C-contiguous, with the strides and storage offsets of the saved tensors applied.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from dn2_jax.errors import DN2Error, DN2FileError

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}

# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; `offset`/`count` (elements) select a legacy storage view."""

    key: str
    dtype: np.dtype
    offset: int = 0
    count: int | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int  # elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _StorageRef, offset: int, shape, stride, *_unused) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_unused) -> _TensorRef:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: str, persistent_load: Callable[[Any], _StorageRef]):
        super().__init__(file)
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DN2Error(f"refusing pickle global '{module}.{name}' in {self._path}") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        return self._persistent_load(pid)


def _storage_ref(pid: Any, path: str) -> _StorageRef:
    """Persistent id `('storage', storage_type, key, location, numel[, view_metadata])` → `_StorageRef`."""
    ok = isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
    if not (ok and isinstance(pid[1], _StorageType)):
        raise DN2FileError(f"unsupported persistent id {pid!r} in {path}")
    view = pid[5] if len(pid) > 5 else None
    if view is None:
        return _StorageRef(str(pid[2]), pid[1].dtype)
    _, offset, count = view
    return _StorageRef(str(pid[2]), pid[1].dtype, int(offset), int(count))


def _materialize(obj: Any, storages: dict[str, np.ndarray], path: str) -> Any:
    """Replaces every `_TensorRef` in nested dicts/lists by an array read from `storages` (key → bytes)."""
    if isinstance(obj, _TensorRef):
        ref = obj.storage
        flat = storages[ref.key].view(ref.dtype)[ref.offset:]
        if ref.count is not None:
            flat = flat[: ref.count]
        needed = obj.offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride, strict=True)) + 1
        if any(n == 0 for n in obj.shape):
            return np.zeros(obj.shape, ref.dtype)
        if obj.offset < 0 or needed > flat.size:
            raise DN2FileError(f"tensor runs past the end of storage {ref.key!r} in {path}")
        strides = tuple(s * ref.dtype.itemsize for s in obj.stride)
        view = np.lib.stride_tricks.as_strided(flat[obj.offset:], obj.shape, strides, writeable=False)
        return np.ascontiguousarray(view).reshape(obj.shape)  # as_strided turns shape () into (1,)
    if isinstance(obj, dict):
        return {k: _materialize(v, storages, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, storages, path) for v in obj)
    return obj


def _storage_keys(obj: Any) -> set[str]:
    if isinstance(obj, _TensorRef):
        return {obj.storage.key}
    if isinstance(obj, dict):
        return set().union(*(_storage_keys(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(_storage_keys(v) for v in obj))
    return set()


def _load_zip(data: bytes, path: str) -> Any:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise DN2FileError(f"{path} is a zip file but not a torch checkpoint (no <archive>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise DN2FileError(f"{path} was saved on a big-endian machine, which is not supported")
        pickled = io.BytesIO(zf.read(pkl[0]))
        obj = _RestrictedUnpickler(pickled, path, lambda pid: _storage_ref(pid, path)).load()
        storages = {k: np.frombuffer(zf.read(f"{prefix}data/{k}"), np.uint8) for k in _storage_keys(obj)}
    return _materialize(obj, storages, path)


def _load_legacy(data: bytes, path: str) -> Any:
    f = io.BytesIO(data)

    def header_load() -> Any:
        return _RestrictedUnpickler(f, path, lambda pid: _storage_ref(pid, path)).load()

    if header_load() != _LEGACY_MAGIC:
        raise DN2FileError(f"{path} is not a torch checkpoint (bad magic number)")
    header_load()  # protocol version
    sys_info = header_load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise DN2FileError(f"{path} was saved on a big-endian machine, which is not supported")
    refs: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
        ref = _storage_ref(pid, path)
        refs.setdefault(ref.key, ref)
        return ref

    obj = _RestrictedUnpickler(f, path, persistent_load).load()
    keys = header_load()
    storages = {}
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * refs[key].dtype.itemsize if key in refs else count
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise EOFError(f"storage {key!r} is truncated")
        storages[str(key)] = np.frombuffer(buf, np.uint8)
    return _materialize(obj, storages, path)


def _load_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = memoryview(data)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise DN2FileError(f"unsupported dtype {info['dtype']} of tensor {name!r} in {path}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= len(body):
            raise EOFError(f"tensor {name!r} runs past the end of the file")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"]).copy()
    return out


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
    """Finds the state dict inside training-script wrappers; strips a DataParallel `module.` prefix."""
    while isinstance(obj, dict) and not all(isinstance(v, np.ndarray) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(map(repr, list(obj)[:10]))
            raise DN2FileError(f"no state dict of tensors found in {path} (top-level keys: {keys})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise DN2FileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch `.pth`/`.pt` (zip or legacy format) or `.safetensors` file into `{name: np.ndarray}`.

    Wrappers such as `{"state_dict": ...}` or `{"model": ...}` are unwrapped and a `module.` prefix is
    stripped. Raises `DN2Error` for a pickle global outside the allow-list and `DN2FileError` for a missing,
    truncated or corrupt file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DN2FileError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        if path.endswith(".safetensors"):
            obj = _load_safetensors(data, path)
        elif data[:4] == b"PK\x03\x04":
            obj = _load_zip(data, path)
        elif data[:1] == b"\x80":
            obj = _load_legacy(data, path)
        else:
            raise DN2FileError(f"{path} is neither a torch checkpoint nor a .safetensors file")
    except DN2Error:
        raise
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, struct.error, KeyError, ValueError,
            TypeError, IndexError, AttributeError, UnicodeDecodeError, MemoryError) as e:
        raise DN2FileError(f"corrupt or truncated checkpoint {path}: {type(e).__name__}: {e}") from None
    return _unwrap(obj, path)
