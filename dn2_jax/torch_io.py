"""Restricted, bounded reader for PyTorch checkpoints (`torch.save` zip and legacy formats) and `.safetensors`.

Nothing here imports torch, and nothing in a file can run code or make the reader use unbounded memory or
time:

- the pickle inside a `.pth` file goes through `dn2_jax.unpickle.restricted_load`: only the few globals a
  state dict needs resolve (tensor rebuild functions, typed storage classes, `OrderedDict`), any other
  (e.g. `os.system`) is refused before it can run; the pickle's size, opcodes, memo, nesting and object count
  are bounded, shared sub-structures are visited once and self-references are refused;
- every tensor's layout is checked in Python integers (no overflow) before any byte is read: offsets and
  strides non-negative, the furthest element inside its storage (or legacy storage view), the storage's
  size consistent wherever it is named; what cannot be proven in bounds is refused naming the tensor;
- storages are read only for the tensors of the state dict, each zip member's declared size must equal what
  its tensors need, decompression is capped at that size (plus one byte, to detect more), members may not
  inflate more than `MAX_INFLATION` times, and the total is capped by `max_bytes`;
- `.safetensors` headers are size-capped and every entry's offsets must lie in the file and match
  dtype x shape.

Tensors come back as C-contiguous numpy arrays (bfloat16 as `ml_dtypes.bfloat16`) with the saved tensors'
strides and storage offsets applied.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.unpickle import restricted_load

MAX_CHECKPOINT_BYTES = 8 << 30  # default cap on the bytes of all tensor storages read from one file
MAX_PICKLE_BYTES = 64 << 20  # cap on a checkpoint's pickle (a ResNet-152's data.pkl is ~60 KB)
MAX_INFLATION = 32  # torch.save stores zip members uncompressed; a member may inflate at most this much
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
MAX_NDIM = 32

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
_KIND = "torch checkpoint"


# slots + frozen: the pickle's BUILD opcode cannot alter these shared allow-list objects.
@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _StorageRef:
    """A storage named by a persistent id: `numel` elements of `dtype`; `offset`/`count` (elements) select
    a legacy storage view (count None: the whole storage)."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0
    count: int | None = None


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _TensorRef:
    """The arguments of a pickled tensor rebuild, unchecked (see `_Layout`)."""

    storage: Any
    offset: Any
    shape: Any
    stride: Any


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A tensor layout proven in bounds: elements `offset + sum(i_k * stride_k)` of `storage`'s region."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.storage.dtype.itemsize


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_unused: Any) -> _TensorRef:
    return _TensorRef(storage, offset, shape, stride)


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _storage_ref(pid: Any, path: str) -> _StorageRef:
    """Persistent id `('storage', storage_type, key, location, numel[, view_metadata])` → `_StorageRef`."""
    ok = isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
    if not (ok and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
            and pid[4] >= 0):
        raise DN2FileError(f"{path}: unsupported persistent id (a {type(pid).__name__}) in the checkpoint")
    view = pid[5] if len(pid) == 6 else None
    if view is None:
        return _StorageRef(pid[2], pid[1].dtype, pid[4])
    if not (isinstance(view, tuple) and len(view) == 3 and _is_int(view[1]) and _is_int(view[2])):
        raise DN2FileError(f"{path}: unsupported storage view of storage {pid[2][:40]!r}")
    return _StorageRef(pid[2], pid[1].dtype, pid[4], view[1], view[2])


def _layout(name: str, ref: Any, path: str) -> _Layout:
    """`ref` checked as a plain strided tensor whose every element lies inside its storage (or view)."""

    def bad(why: str) -> DN2FileError:
        return DN2FileError(f"{path}: tensor {name!r} has an unsupported or out-of-bounds layout: {why}")

    if not isinstance(ref, _TensorRef) or not isinstance(ref.storage, _StorageRef):
        raise bad("it is not backed by a storage")
    st, offset = ref.storage, ref.offset
    try:
        shape, stride = tuple(ref.shape), tuple(ref.stride)
    except TypeError:
        raise bad("its size or stride is not a sequence") from None
    if len(shape) != len(stride) or len(shape) > MAX_NDIM:
        raise bad(f"{len(shape)} sizes and {len(stride)} strides (at most {MAX_NDIM} dimensions)")
    if not all(_is_int(v) for v in (offset, *shape, *stride)):
        raise bad("its offset, sizes and strides must be integers")
    if offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0:
        raise bad(f"negative offset, size or stride (offset {offset}, size {shape}, stride {stride})")
    count = st.numel - st.offset if st.count is None else st.count
    if st.offset < 0 or count < 0 or st.offset + count > st.numel:
        raise bad(f"storage view [{st.offset}, {st.offset}+{count}) outside a storage of {st.numel} elements")
    if math.prod(shape) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if last >= count:
            raise bad(f"size {shape} with stride {stride} at offset {offset} reaches element {last}, "
                      f"but its storage {st.key!r} holds {count}")
    elif max(shape, default=0) > 1 << 48:
        raise bad(f"size {shape}")
    return _Layout(st, offset, shape, stride)


def _materialize(layout: _Layout, storage: bytes | memoryview) -> np.ndarray:
    """The tensor `layout` (proven in bounds by `_layout`) read from its storage's bytes."""
    st = layout.storage
    if math.prod(layout.shape) == 0:
        return np.zeros(layout.shape, st.dtype)
    count = st.numel - st.offset if st.count is None else st.count
    flat = np.frombuffer(storage, st.dtype, count=count, offset=st.offset * st.dtype.itemsize)
    strides = tuple(s * st.dtype.itemsize for s in layout.stride)
    view = np.lib.stride_tricks.as_strided(flat[layout.offset:], layout.shape, strides, writeable=False)
    return np.array(view, order="C").reshape(layout.shape)  # as_strided turns shape () into (1,)


def _plan(state_dict: dict[str, Any], path: str, max_bytes: int) -> tuple[dict[str, _Layout], dict[str, int]]:
    """Layouts of every tensor and the byte size of every storage they need, checked against `max_bytes`."""
    layouts = {name: _layout(name, ref, path) for name, ref in state_dict.items()}
    storages: dict[str, _StorageRef] = {}
    for name, lay in layouts.items():
        first = storages.setdefault(lay.storage.key, lay.storage)
        if (first.dtype, first.numel) != (lay.storage.dtype, lay.storage.numel):
            raise DN2FileError(f"{path}: storage {first.key!r} of tensor {name!r} is declared with two sizes "
                               f"or types ({first.numel} {first.dtype}, {lay.storage.numel} {lay.storage.dtype})")
    sizes = {k: st.numel * st.dtype.itemsize for k, st in storages.items()}
    total = sum(sizes.values())
    out = sum(lay.nbytes for lay in layouts.values())
    if total > max_bytes or out > max(2 * total, 1 << 20):
        raise DN2FileError(f"{path}: the tensors need {total} bytes of storage and {out} bytes as arrays; the "
                           f"limits are {max_bytes} bytes of storage (max_bytes) and, as arrays, twice their storage")
    return layouts, sizes


def _read_tensors(plan: tuple[dict[str, _Layout], dict[str, int]],
                  read: Callable[[str, int], bytes | memoryview]) -> dict[str, np.ndarray]:
    """The tensors of `plan` (from `_plan`), each storage read once with `read(key, nbytes)`."""
    layouts, sizes = plan
    buffers = {key: read(key, n) for key, n in sizes.items()}
    return {name: _materialize(lay, buffers[lay.storage.key]) for name, lay in layouts.items()}


def _read_member(zf: zipfile.ZipFile, name: str, nbytes: int | None, cap: int, path: str) -> bytes:
    """Member `name`, which must hold exactly `nbytes` (None: at most `cap`); never inflates more than that."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise DN2FileError(f"{path}: the checkpoint has no member {name}") from None
    want = info.file_size if nbytes is None else nbytes
    if info.file_size != want or want > cap:
        need = f"the tensors need {nbytes}" if nbytes is not None else f"the limit is {cap}"
        raise DN2FileError(f"{path}: member {name} declares {info.file_size} bytes; {need}")
    if info.compress_type != zipfile.ZIP_STORED and want > MAX_INFLATION * info.compress_size + (1 << 20):
        raise DN2FileError(f"{path}: member {name} inflates {info.compress_size} bytes to {want} "
                           f"(more than {MAX_INFLATION}x; torch.save does not compress)")
    with zf.open(info) as f:
        buf = f.read(want + 1)  # bounded: one byte more than allowed, which reaches the end and its CRC check
    if len(buf) != want:
        raise DN2FileError(f"{path}: member {name} holds {len(buf)}{'+' if len(buf) > want else ''} bytes, "
                           f"not the {want} it declares")
    return buf


def _load_zip(data: bytes, path: str, max_bytes: int) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise DN2FileError(f"{path} is a zip file but not a torch checkpoint (no <archive>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and _read_member(zf, order, None, 16, path).strip() != b"little":
            raise DN2FileError(f"{path} was saved on a big-endian machine, which is not supported")
        pickled = io.BytesIO(_read_member(zf, pkl[0], None, MAX_PICKLE_BYTES, path))
        obj = restricted_load(pickled, path, _ALLOWED_GLOBALS, kind=_KIND,
                              persistent_load=lambda pid: _storage_ref(pid, path))
        return _read_tensors(_plan(_unwrap(obj, path), path, max_bytes),
                             lambda key, n: _read_member(zf, f"{prefix}data/{key}", n, max_bytes, path))


def _load_legacy(data: bytes, path: str, max_bytes: int) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)

    def load(persistent_load: Callable[[Any], Any] | None = None) -> Any:
        return restricted_load(f, path, _ALLOWED_GLOBALS, kind=_KIND, persistent_load=persistent_load)

    if load() != _LEGACY_MAGIC:
        raise DN2FileError(f"{path} is not a torch checkpoint (bad magic number)")
    load()  # protocol version
    sys_info = load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise DN2FileError(f"{path} was saved on a big-endian machine, which is not supported")
    refs: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
        ref = _storage_ref(pid, path)
        refs.setdefault(ref.key, ref)
        return ref

    state_dict = _unwrap(load(persistent_load), path)
    keys = load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise DN2FileError(f"{path}: the legacy checkpoint's storage list is not a list of names")
    plan = _plan(state_dict, path, max_bytes)
    sizes = plan[1]
    # Storages follow as (int64 element count, bytes) in `keys` order: locate each without copying.
    found: dict[str, memoryview] = {}
    pos, view = f.tell(), memoryview(data)
    for key in keys:
        if key not in refs or key in found:
            raise DN2FileError(f"{path}: storage {key[:40]!r} is listed twice or used by no tensor")
        if pos + 8 > len(data):
            raise DN2FileError(f"{path}: truncated before storage {key[:40]!r}")
        (count,) = struct.unpack_from("<q", data, pos)
        nbytes = refs[key].numel * refs[key].dtype.itemsize
        if count != refs[key].numel or pos + 8 + nbytes > len(data):
            raise DN2FileError(f"{path}: storage {key[:40]!r} holds {count} elements, declared "
                               f"{refs[key].numel}, or is truncated")
        found[key] = view[pos + 8: pos + 8 + nbytes]
        pos += 8 + nbytes
    missing = [k for k in sizes if k not in found]
    if missing:
        raise DN2FileError(f"{path}: storage {missing[0][:40]!r} is missing")
    return _read_tensors(plan, lambda key, n: found[key])


def _load_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
    if len(data) < 8:
        raise DN2FileError(f"{path}: truncated .safetensors file (no header)")
    (header_len,) = struct.unpack_from("<Q", data)
    if header_len > min(len(data) - 8, MAX_SAFETENSORS_HEADER):
        raise DN2FileError(f"{path}: .safetensors header of {header_len} bytes does not fit the file "
                           f"({len(data)} bytes) or the format's {MAX_SAFETENSORS_HEADER}-byte limit")
    try:
        header = json.loads(data[8: 8 + header_len])
    except (ValueError, RecursionError) as e:
        raise DN2FileError(f"{path}: corrupt .safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise DN2FileError(f"{path}: corrupt .safetensors header (not a JSON object)")
    body = memoryview(data)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
        offsets = info.get("data_offsets") if ok else None
        if not (ok and isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and len(info["shape"]) <= MAX_NDIM and all(_is_int(n) and n >= 0 for n in info["shape"])):
            raise DN2FileError(f"{path}: tensor {name[:60]!r} has a malformed header entry")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise DN2FileError(f"{path}: unsupported dtype {info['dtype'][:20]} of tensor {name[:60]!r}")
        dtype, (start, end), shape = _SAFETENSORS_DTYPES[info["dtype"]], offsets, tuple(info["shape"])
        if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
            raise DN2FileError(f"{path}: tensor {name[:60]!r} bytes [{start}, {end}) do not fit the file "
                               f"({len(body)} data bytes) or its {info['dtype']} shape {list(shape)}")
        out[name] = np.frombuffer(body[start:end], dtype).reshape(shape).copy()
    return out


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
    """Finds the state dict inside training-script wrappers; strips a DataParallel `module.` prefix.

    `obj` is acyclic and of bounded depth (`restricted_load`), so the descent ends.
    """
    def is_tensor(v: Any) -> bool:
        return isinstance(v, (_TensorRef, np.ndarray))

    while isinstance(obj, dict) and not all(is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(repr(k)[:60] for k in list(obj)[:10])
            raise DN2FileError(f"no state dict of tensors found in {path} (top-level keys: {keys})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise DN2FileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if not all(isinstance(k, str) for k in obj):
        raise DN2FileError(f"{path}: the state dict has keys that are not strings")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: str | os.PathLike, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> dict[str, np.ndarray]:
    """Reads a torch `.pth`/`.pt` (zip or legacy format) or `.safetensors` file into `{name: np.ndarray}`.

    Wrappers such as `{"state_dict": ...}` or `{"model": ...}` are unwrapped and a `module.` prefix is
    stripped; only the state dict's tensors are read. `max_bytes` caps the tensor bytes read (and the file
    size). Raises `DN2FileError` (a `DN2Error`) naming the file, and the tensor where there is one, for a
    pickle global outside the allow-list, a layout that is not provably inside its storage, a pickle or zip
    past the work bounds (module docstring), and a missing, truncated or corrupt file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > max_bytes + MAX_PICKLE_BYTES:
            raise DN2FileError(f"{path}: {size} bytes, more than the limit of {max_bytes} (max_bytes)")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DN2FileError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        if path.endswith(".safetensors"):
            return _unwrap(_load_safetensors(data, path), path)
        if data[:4] == b"PK\x03\x04":
            return _load_zip(data, path, max_bytes)
        if data[:1] == b"\x80":
            return _load_legacy(data, path, max_bytes)
        raise DN2FileError(f"{path} is neither a torch checkpoint nor a .safetensors file")
    except DN2Error:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError) as e:  # zipfile and zlib on corrupt archives
        raise DN2FileError(f"corrupt or truncated checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
