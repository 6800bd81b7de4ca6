import os
import pickle
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
