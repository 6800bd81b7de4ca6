import contextlib
import json
import os
import pickle
import pickletools
import signal
import struct
import zipfile

import numpy as np
import pytest
import torch

from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.torch_io import load_state_dict


def _random_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "transposed": base.t(),  # non-contiguous strides
        "sliced": base[2:, 1:4],  # storage offset + strides
        "half": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 2, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "count": torch.tensor(12345678901, dtype=torch.int64),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(4, generator=g) > 0.5,
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "empty": torch.zeros(0, 3),
    }


def _assert_same(ours: dict[str, np.ndarray], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for k, t in ref.items():
        t = t.detach()
        got = ours[k]
        assert got.shape == tuple(t.shape), k
        if t.dtype == torch.bfloat16:
            assert str(got.dtype) == "bfloat16", k
            np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
        else:
            assert got.dtype == t.numpy().dtype, k
            np.testing.assert_array_equal(got, t.numpy())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_roundtrip(tmp_path, zip_format):
    sd = _random_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    _assert_same(load_state_dict(path), sd)


def test_module_state_dict_with_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    _assert_same(load_state_dict(path), model.state_dict())


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in _random_state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    _assert_same(load_state_dict(path), sd)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapper_and_module_prefix(tmp_path, wrapper):
    sd = {"module.fc.weight": torch.randn(2, 3), "module.fc.bias": torch.randn(2)}
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, wrapper: sd, "optimizer": {"lr": 0.1}}, path)
    got = load_state_dict(path)
    assert set(got) == {"fc.weight", "fc.bias"}
    np.testing.assert_array_equal(got["fc.weight"], sd["module.fc.weight"].numpy())


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"epoch": 3, "weights_of": "nothing"}, path)
    with pytest.raises(DN2FileError, match="no state dict"):
        load_state_dict(path)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _evil_payloads(marker):
    return {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "builtins.exec": _Evil(exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["os.system", "builtins.exec"])
def test_refuses_code_execution(tmp_path, zip_format, name):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _evil_payloads(marker)[name]}, protocol=2)
    path = tmp_path / "evil.pth"
    if zip_format:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", payload)
    else:
        path.write_bytes(payload)
    # os.system pickles as posix.system on Linux; protocol 2 writes builtins as __builtin__.
    refused = r"pickle global (posix|os|builtins|__builtin__)\.(system|exec) is not allowed"
    with pytest.raises(DN2Error, match=refused) as e:
        load_state_dict(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_file(tmp_path, zip_format):
    full = tmp_path / "full.pth"
    torch.save(_random_state_dict(), full, _use_new_zipfile_serialization=zip_format)
    data = full.read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 20):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(DN2FileError, match="cut"):
            load_state_dict(path)


def test_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((10, 10), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(DN2FileError, match="w.safetensors"):
        load_state_dict(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(DN2FileError, match="nope.pth"):
        load_state_dict(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(DN2FileError, match="garbage.pth"):
        load_state_dict(garbage)


# ------------------------------------------------------------------ crafted hostile files (issue 12)
# Pickles are assembled from protocol-2 opcodes; `_lit` gives the opcodes of one plain value.


def _lit(value) -> bytes:
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(key: str, numel: int, offset: int, shape, stride, view=None) -> bytes:
    """Opcodes of `_rebuild_tensor_v2(<storage key>, offset, shape, stride, False, OrderedDict())`."""
    pid = b"(" + _lit("storage") + _global("torch", "FloatStorage") + _lit(key) + _lit("cpu") + _lit(numel)
    pid += (_lit(view) if view is not None else b"") + b"tQ"  # TUPLE, BINPERSID
    args = b"(" + pid + _lit(offset) + _lit(tuple(shape)) + _lit(tuple(stride)) + b"\x89"
    return _global("torch._utils", "_rebuild_tensor_v2") + args + _global("collections", "OrderedDict") + b")RtR"


def _state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_lit(k) + v for k, v in entries.items())
    return b"\x80\x02}(" + body + b"u."


def _write_checkpoint(path, pickled: bytes, storages: dict[str, bytes], fmt: str = "zip",
                      compress: int = zipfile.ZIP_STORED) -> None:
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", compression=compress) as zf:
            zf.writestr("ckpt/data.pkl", pickled)
            zf.writestr("ckpt/byteorder", "little")
            for key, data in storages.items():
                zf.writestr(f"ckpt/data/{key}", data)
        return
    header = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    tail = pickle.dumps(list(storages), protocol=2)
    blobs = b"".join(struct.pack("<q", len(d) // 4) + d for d in storages.values())
    path.write_bytes(header + pickled + tail + blobs)


def _floats(n: int) -> bytes:
    return np.arange(n, dtype=np.float32).tobytes()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_crafted_in_bounds_layouts_load(tmp_path, fmt):
    """The crafting helpers make readable checkpoints (so the refusals below are about the layouts)."""
    pickled = _state_dict_pickle({"w": _tensor("0", 64, 3, (2, 3), (1, 20)), "v": _tensor("0", 64, 0, (4,), (16,),
                                                                                              view=None)})
    path = tmp_path / "ok.pth"
    _write_checkpoint(path, pickled, {"0": _floats(64)}, fmt)
    got = load_state_dict(path)
    np.testing.assert_array_equal(got["w"], [[3, 23, 43], [4, 24, 44]])
    np.testing.assert_array_equal(got["v"], [0, 16, 32, 48])
    assert got["w"].flags.c_contiguous


_BAD_LAYOUTS = {
    # name: (offset, shape, stride, message); the storage holds 64 floats
    "negative stride": (0, (64,), (-1_000_000,), "negative"),
    "small negative stride": (63, (64,), (-1,), "negative"),
    "offset past the end": (100, (1,), (1,), "reaches element 100"),
    "extent past the end": (0, (8, 9), (9, 1), "reaches element 71"),
    "overflowing sizes": (0, (2**62, 2**62), (2**62, 1), "holds 64"),
    "negative size": (0, (-1, 4), (4, 1), "negative"),
    "float stride": (0, (4,), (1.5,), "integers"),
    "rank mismatch": (0, (4, 4), (1,), "sizes and 1 strides"),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("case", list(_BAD_LAYOUTS))
def test_out_of_bounds_layouts_are_refused(tmp_path, fmt, case):
    offset, shape, stride, message = _BAD_LAYOUTS[case]
    path = tmp_path / "bad.pth"
    _write_checkpoint(path, _state_dict_pickle({"fc.weight": _tensor("0", 64, offset, shape, stride)}),
                      {"0": _floats(64)}, fmt)
    with pytest.raises(DN2FileError, match=message) as e:
        load_state_dict(path)
    assert str(path) in str(e.value) and "'fc.weight'" in str(e.value)


def test_legacy_storage_view_outside_its_storage(tmp_path):
    path = tmp_path / "view.pth"
    pickled = _state_dict_pickle({"w": _tensor("0", 64, 0, (4,), (1,), view=("0", 62, 4))})
    _write_checkpoint(path, pickled, {"0": _floats(64)}, "legacy")
    with pytest.raises(DN2FileError, match=r"'w'.*storage view \[62, 62\+4\)"):
        load_state_dict(path)


def test_storage_size_must_match_its_bytes(tmp_path):
    path = tmp_path / "short.pth"  # the pickle says 64 floats, the member holds 60
    _write_checkpoint(path, _state_dict_pickle({"w": _tensor("0", 64, 0, (64,), (1,))}), {"0": _floats(60)})
    with pytest.raises(DN2FileError, match="declares 240 bytes; the tensors need 256"):
        load_state_dict(path)


@contextlib.contextmanager
def _deadline(seconds: int):
    """Turns a hang into a test failure (SIGALRM; the bounded reader answers in well under a second)."""
    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _shared_lists_dag(levels: int) -> bytes:
    """L0 = []; L_i = [L_{i-1}, L_{i-1}]: 2**levels paths through `levels` + 1 lists (L_levels on the stack)."""
    ops = b"]q\x00"
    for i in range(1, levels + 1):
        ops += b"0](h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"eq" + bytes([i])
    return ops


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_shared_structure_costs_its_size_not_its_paths(tmp_path, fmt):
    path = tmp_path / "dag.pth"
    dag = _shared_lists_dag(60)
    pickled = _state_dict_pickle({"w": _tensor("0", 64, 0, (64,), (1,)), "extra": dag})
    _write_checkpoint(path, pickled, {"0": _floats(64)}, fmt)
    with _deadline(20), pytest.raises(DN2FileError, match="no state dict of tensors"):
        load_state_dict(path)
    # Wrapped: the DAG sits next to the state dict, which loads.
    pickled = b"\x80\x02}(" + _lit("model") + _state_dict_pickle({"w": _tensor("0", 64, 0, (64,), (1,))})[2:-1]
    pickled += _lit("history") + dag + b"u."
    _write_checkpoint(path, pickled, {"0": _floats(64)}, fmt)
    with _deadline(20):
        np.testing.assert_array_equal(load_state_dict(path)["w"], np.arange(64))


def test_map_tree_visits_shared_objects_once():
    from dn2_jax.unpickle import map_tree

    leaf = [0]
    node = [1]
    for _ in range(80):
        node = [node, node]
    seen = []
    out = map_tree({"a": node, "b": leaf}, lambda x: seen.append(x) or x, "x")
    assert out["a"][0] is out["a"][1] and len(seen) == 2  # the ints 1 and 0, once each


_HOSTILE_PICKLES = {
    "self-referencing list": (b"\x80\x02}(X\x01\x00\x00\x00w]q\x00h\x00au.", "contains itself"),
    "self-referencing wrapper": (b"\x80\x02}q\x00X\x0a\x00\x00\x00state_dicth\x00s.", "contains itself"),
    "deep lists": (b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".", "nested deeper than 100"),
    "deep tuple as a key": (b"\x80\x02}N" + b"\x85" * 1_000_000 + b"Ns.", "tuples nested deeper than 100"),
    "huge memo index": (b"\x80\x02]r\xf0\xff\xff\xff.", "memo index 4294967280"),
    "unbalanced stack": (b"\x80\x02a.", "pops more values"),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("case", list(_HOSTILE_PICKLES))
def test_hostile_pickles_are_refused(tmp_path, fmt, case):
    pickled, message = _HOSTILE_PICKLES[case]
    path = tmp_path / "hostile.pth"
    _write_checkpoint(path, pickled, {}, fmt)
    with _deadline(20), pytest.raises(DN2FileError, match=message) as e:
        load_state_dict(path)
    assert str(path) in str(e.value)


def test_pickle_member_size_is_capped(tmp_path, monkeypatch):
    from dn2_jax import torch_io

    path = tmp_path / "ok.pth"
    pickled = _state_dict_pickle({"w": _tensor("0", 64, 0, (64,), (1,))})
    _write_checkpoint(path, pickled, {"0": _floats(64)})
    monkeypatch.setattr(torch_io, "MAX_PICKLE_BYTES", len(pickled) - 1)
    with pytest.raises(DN2FileError, match=rf"data.pkl declares {len(pickled)} bytes; the limit is"):
        load_state_dict(path)


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    """64 MiB of zeros deflate to 64 KiB; torch.save never compresses, so > 32x inflation is refused."""
    import tracemalloc

    n = 16 << 20
    path = tmp_path / "bomb.pth"
    _write_checkpoint(path, _state_dict_pickle({"w": _tensor("0", n, 0, (n,), (1,))}), {"0": bytes(4 * n)},
                      compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DN2FileError, match=r"inflates \d+ bytes to 67108864"):
            load_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # the file is read, nothing is inflated


def test_member_that_inflates_past_its_declared_size(tmp_path):
    """A member whose headers declare 256 bytes but whose stream inflates to 1 MiB: read stops at 257."""
    path = tmp_path / "liar.pth"
    pickled = _state_dict_pickle({"w": _tensor("0", 64, 0, (64,), (1,))})
    real = bytes(1 << 20)
    _write_checkpoint(path, pickled, {"0": real}, compress=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    for sig, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory entry
        name_at = data.index(b"ckpt/data/0")
        start = data.rindex(sig, 0, name_at)
        assert struct.unpack_from("<I", data, start + field)[0] == len(real)
        struct.pack_into("<I", data, start + field, 256)
        data[name_at:name_at + 11] = b"ckpt/data/X"  # so the next search finds the other header
    path.write_bytes(bytes(data).replace(b"ckpt/data/X", b"ckpt/data/0"))
    with pytest.raises(DN2FileError, match="liar.pth"):
        load_state_dict(path)


def test_total_size_cap(tmp_path):
    path = tmp_path / "big.pth"
    _write_checkpoint(path, _state_dict_pickle({"w": _tensor("0", 1 << 18, 0, (1 << 18,), (1,))}),
                      {"0": bytes(1 << 20)})
    assert load_state_dict(path)["w"].shape == (1 << 18,)
    with pytest.raises(DN2FileError, match=r"need 1048576 bytes of storage.*limits are 1000000"):
        load_state_dict(path, max_bytes=1_000_000)


def test_many_views_of_one_storage_are_capped(tmp_path):
    """2000 tensors viewing the same 1 MiB storage would need 2 GiB as arrays: refused before reading."""
    n = 1 << 18
    path = tmp_path / "views.pth"
    entries = {f"w{i}": _tensor("0", n, 0, (n,), (1,)) for i in range(2000)}
    _write_checkpoint(path, _state_dict_pickle(entries), {"0": _floats(n)})
    with pytest.raises(DN2FileError, match="as arrays, twice their storage"):
        load_state_dict(path)


def _safetensors_file(path, header, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("case", ["deep json", "header past the end", "offsets vs shape", "offsets past the end",
                                  "negative shape", "not an object"])
def test_bad_safetensors_headers(tmp_path, case):
    path = tmp_path / "w.safetensors"
    body = _floats(16)
    header = {
        "deep json": b"[" * 100_000 + b"]" * 100_000,
        "header past the end": None,
        "offsets vs shape": {"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}},
        "offsets past the end": {"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}},
        "negative shape": {"a": {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}},
        "not an object": {"a": 5},
    }[case]
    if header is None:
        path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    else:
        _safetensors_file(path, header, body)
    with pytest.raises(DN2FileError, match="w.safetensors"):
        load_state_dict(path)


def test_cli_convert_of_a_hostile_file_is_one_error_line(tmp_path, capsys):
    from dn2_jax import cli

    src = tmp_path / "evil.pth"
    _write_checkpoint(src, _state_dict_pickle({"conv1.weight": _tensor("0", 64, 0, (64,), (-1_000_000,))}),
                      {"0": _floats(64)})
    out = tmp_path / "out"
    assert cli.main(["convert", str(src), str(out), "--backbone", "resnet18"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dn2: error: ") and "evil.pth" in err[0] and "negative" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]
