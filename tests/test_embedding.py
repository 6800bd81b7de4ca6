import dataclasses
import functools
import os
import platform
import subprocess
import sys
import textwrap
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dn2_jax.embedding import embed, make_embed_fn
from dn2_jax.errors import DN2Error
from dn2_jax.models import BackboneSpec, get_backbone, init_random_variables
from dn2_jax.preprocessing import PRESETS, preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    """A two-conv stand-in backbone with the registry's interface (dict of features, `dtype` field)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), 2, dtype=self.dtype, name="conv1")(x))
        stage1 = x
        x = nn.relu(nn.Conv(16, (3, 3), 2, dtype=self.dtype, name="conv2")(x))
        return {"stage1": stage1, "stage2": x, "pooled": jnp.mean(x, axis=(1, 2))}


def _tiny_spec() -> BackboneSpec:
    return BackboneSpec(name="tiny", module=TinyNet, preset=PRESETS["imagenet"].at_size(16), feature_dim=16,
                        from_state_dict=lambda sd: sd)


@functools.cache
def _tiny_variables():
    return init_random_variables(_tiny_spec())


def _images(n, h=20, w=24, c=3, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _direct(spec, variables, images, feature="pooled", input_size=None):
    """Un-jitted, unbatched reference: preprocess → apply."""
    preset = spec.preset if input_size is None else spec.preset.at_size(input_size)
    return np.asarray(spec.module().apply(variables, preprocess(images, preset))[feature])


def test_equals_direct_apply_with_ragged_last_batch():
    spec, variables = _tiny_spec(), _tiny_variables()
    images = _images(7)
    ref = _direct(spec, variables, images)
    got = embed(images, spec, variables, batch_size=3, progress=False)  # batches 3 + 3 + 1 (padded)
    assert got.dtype == np.float32 and got.shape == (7, 16)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    whole = embed(images, spec, variables, batch_size=64, progress=False)
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    # Deterministic: the same call gives the same bits.
    np.testing.assert_array_equal(embed(images, spec, variables, batch_size=3, progress=False), got)


def test_embed_fn_any_batch_and_spatial_feature_is_pooled():
    spec, variables = _tiny_spec(), _tiny_variables()
    images = _images(5, c=None)  # grayscale NHW
    fn = make_embed_fn(spec, variables, batch_size=2, feature="stage1")
    assert fn.feature_dim == 8 and fn.batch_size == 2
    ref = _direct(spec, variables, images, feature="stage1").mean(axis=(1, 2))
    np.testing.assert_allclose(fn(images), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(DN2Error, match="empty"):
        fn(images[:0])


def test_mixed_sizes_keep_input_order():
    spec, variables = _tiny_spec(), _tiny_variables()
    small, large, gray = _images(3, 18, 18, seed=1), _images(2, 30, 22, seed=2), _images(2, 25, 25, None, seed=3)
    items = [small[0], large[0], gray[0], small[1], large[1], small[2], gray[1]]
    got = embed(items, spec, variables, batch_size=2, progress=False)
    expected = [_direct(spec, variables, im[None])[0] for im in items]
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
    spec = get_backbone("efficientnet_lite0")
    variables = init_random_variables(spec)
    images = _images(3)
    f32 = embed(images, spec, variables, input_size=32, progress=False)
    bf16 = embed(images, spec, variables, input_size=32, dtype=jnp.bfloat16, progress=False)
    assert bf16.dtype == np.float32 and bf16.shape == f32.shape == (3, 1280)
    assert not np.array_equal(bf16, f32)  # really computed in bfloat16
    rel = np.linalg.norm(bf16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
    assert rel.max() < 0.05


def test_bad_input_rejected_before_compute():
    spec = _tiny_spec()
    # variables=None would fail on first use: the DN2Error proves validation came first.
    with pytest.raises(DN2Error, match="uint8"):
        embed(np.zeros((2, 8, 8, 3), np.float32), spec, None)
    with pytest.raises(DN2Error, match=r"images\[1\].*uint8"):
        embed([_images(1)[0], np.zeros((8, 8), np.int32)], spec, None)
    with pytest.raises(DN2Error, match=r"images\[0\].*C = 1 or 3"):
        embed([np.zeros((8, 8, 4), np.uint8)], spec, None)
    with pytest.raises(DN2Error, match="shape"):
        embed(np.zeros((8, 8), np.uint8), spec, None)
    # one RGB image is not 32 grayscale images 3 pixels wide: refused, with the fix in the message
    with pytest.raises(DN2Error, match=r"looks like a single image.*images\[None\]"):
        embed(np.zeros((32, 32, 3), np.uint8), spec, None)
    with pytest.raises(DN2Error, match="images is empty"):
        embed(np.zeros((0, 8, 8, 3), np.uint8), spec, None)
    with pytest.raises(DN2Error, match="images is empty"):
        embed([], spec, None)
    with pytest.raises(DN2Error, match=r"images\[0\] must be one image"):
        embed([np.zeros((1, 8, 8, 3), np.uint8)], spec, None)
    fn = make_embed_fn(spec, _tiny_variables())
    with pytest.raises(DN2Error, match="looks like a single image"):
        fn(np.zeros((32, 32, 3), np.uint8))


def test_unambiguous_layouts_agree():
    """(N, H, W) and (N, H, W, 1) are the same grayscale batch; a list of (H, W) images too, even 3 wide."""
    spec, variables = _tiny_spec(), _tiny_variables()
    gray = _images(3, 20, 24, None, seed=4)
    want = embed(gray, spec, variables, progress=False)
    np.testing.assert_array_equal(embed(gray[..., None], spec, variables, progress=False), want)
    np.testing.assert_array_equal(embed(list(gray), spec, variables, progress=False), want)
    np.testing.assert_array_equal(embed(gray[:1], spec, variables, progress=False), want[:1])
    narrow = _images(2, 20, 3, None, seed=5)  # grayscale 3 px wide: as a list, or with a channel axis
    np.testing.assert_array_equal(embed(list(narrow), spec, variables, progress=False),
                                  embed(narrow[..., None], spec, variables, progress=False))


_COMPILES: list[str] | None = None  # while a test counts: names of the embedding forward passes compiled


def _on_compile(event, duration, **kwargs):
    if _COMPILES is not None and event == "/jax/core/compile/backend_compile_duration":
        if "_forward" in str(kwargs.get("fun_name")):
            _COMPILES.append(kwargs["fun_name"])


@functools.cache
def _listen_to_compiles() -> None:
    # Registered once per session (jax 0.6.x has no jax.monitoring unregister); idle unless counting.
    jax.monitoring.register_event_duration_secs_listener(_on_compile)


class _CompileCounter:
    """Counts XLA compilations of the embedding forward pass (a jax.monitoring listener)."""

    def __enter__(self):
        global _COMPILES
        _listen_to_compiles()
        _COMPILES = self.names = []
        return self

    def __exit__(self, *exc):
        global _COMPILES
        _COMPILES = None

    @property
    def count(self) -> int:
        return len(self.names)


def test_one_compilation_per_image_shape_across_calls():
    from dn2_jax.embedding import clear_embed_cache

    clear_embed_cache()
    spec, variables = _tiny_spec(), _tiny_variables()
    with _CompileCounter() as compiles:
        a = embed(_images(10, seed=6), spec, variables, batch_size=4, progress=False)  # 4 + 4 + 2 (padded)
        assert compiles.count == 1
        b = embed(_images(7, seed=7), spec, variables, batch_size=4, progress=False)  # another subset
        assert compiles.count == 1, compiles.names
        fn = make_embed_fn(spec, variables, batch_size=4)  # the same cached function
        np.testing.assert_array_equal(fn(_images(7, seed=7)), b)
        np.testing.assert_array_equal(fn(_images(9, seed=6)[:5]), a[:5])
        assert compiles.count == 1
        embed(_images(6, 30, 22, seed=8), spec, variables, batch_size=4, progress=False)  # a new shape
        assert compiles.count == 2
        mixed = [_images(1, 30, 22, seed=9)[0], _images(1, seed=10)[0]] * 3  # both shapes seen, 3 each
        embed(mixed, spec, variables, batch_size=4, progress=False)
        assert compiles.count == 2, compiles.names
        # fewer images than a batch, of a shape already compiled: the full batch is reused
        embed(_images(1, seed=11), spec, variables, batch_size=4, progress=False)
        assert compiles.count == 2
        # of a new shape: padded to a power of two (not the full batch), compiled once
        one = embed(_images(1, 12, 12, seed=12), spec, variables, batch_size=4, progress=False)
        embed(_images(1, 12, 12, seed=13), spec, variables, batch_size=4, progress=False)
        assert compiles.count == 3
    np.testing.assert_allclose(one, _direct(spec, variables, _images(1, 12, 12, seed=12)), rtol=1e-5, atol=1e-6)
    fn = make_embed_fn(spec, variables, batch_size=4)
    assert fn.padded_size(3, (20, 24, 3)) == 4 and fn.padded_size(1, (12, 12, 3)) == 1
    assert fn.padded_size(3, (9, 9, 3)) == 4 and fn.padded_size(2, (9, 9, 3)) == 2
    assert make_embed_fn(spec, variables, batch_size=64).padded_size(5) == 8


def test_bad_options():
    spec, variables = _tiny_spec(), _tiny_variables()
    with pytest.raises(DN2Error, match="feature 'logits'.*available: stage1, stage2, pooled"):
        make_embed_fn(spec, variables, feature="logits")
    with pytest.raises(DN2Error, match="axis 'data'"):
        make_embed_fn(spec, variables, mesh=Mesh(np.asarray(jax.devices()), ("batch",)))
    with pytest.raises(DN2Error, match="dtype"):
        make_embed_fn(spec, variables, dtype=jnp.int8)
    with pytest.raises(DN2Error, match="batch_size"):
        make_embed_fn(spec, variables, batch_size=0)
    with pytest.raises(DN2Error, match="unknown backbone"):
        make_embed_fn("vgg16", variables)


_SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_embedding import _images, _tiny_spec, _tiny_variables
    from dn2_jax.embedding import embed, make_embed_fn
    from dn2_jax.sharding import data_mesh

    assert jax.device_count() == 4, jax.devices()
    spec, variables = _tiny_spec(), _tiny_variables()
    images = _images(10)
    fn = make_embed_fn(spec, variables, batch_size=6)
    assert fn.batch_size == 8 and fn.mesh.shape["data"] == 4, (fn.batch_size, fn.mesh)
    sharded = embed(images, spec, variables, batch_size=6, progress=False)
    single = embed(images, spec, variables, batch_size=6, mesh=data_mesh(jax.devices()[:1]), progress=False)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    assert np.abs(sharded).max() > 0
    print("OK", sharded.shape)
""")


def test_sharded_over_four_cpu_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = _SHARDED_SCRIPT.format(tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (10, 16)" in proc.stdout


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "resnet18", "resnet50"])
def test_registry_feature_dims_match_modules(name):
    if name.startswith("resnet"):
        pytest.importorskip("dn2_jax.models.resnet")
    spec = get_backbone(name)
    variables = init_random_variables(spec)
    probe = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    inference_module, inference_variables = spec.for_inference(variables)
    for module, v in ((spec.module(), variables), (inference_module(), inference_variables)):
        assert jax.eval_shape(module.apply, v, probe)["pooled"].shape == (1, spec.feature_dim)
    # make_embed_fn takes the spec's feature_dim for "pooled" features instead of tracing the network for it.
    assert make_embed_fn(spec, variables, input_size=32).feature_dim == spec.feature_dim
    assert dataclasses.is_dataclass(spec) and spec.name == name


# A worker thread allocates, touches and frees 256 MB three times; prints the minor page faults of the last round.
_REUSE_SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from dn2_jax.hostmem import keep_freed_memory

    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    faults = []

    def work(size=256 << 20):
        for _ in range(3):
            p = libc.malloc(size)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            libc.memset(p, 1, size)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            libc.free(p)

    t = threading.Thread(target=work)  # like XLA's workers: a thread started after the setting
    t.start()
    t.join()
    print(applied, faults[-1])
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc options")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """XLA:CPU frees ~1 GB of scratch per batch; glibc must hand the same pages back, not fault in new ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, mode], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        applied, faults = proc.stdout.split()
        out[mode] = (applied, int(faults))
    pages = (256 << 20) // 4096
    assert out["default"][1] > pages // 2, out  # glibc's default: the block is mmapped and unmapped every round
    assert out["keep"][0] == "True" and out["keep"][1] < pages // 100, out


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    from dn2_jax.hostmem import keep_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert keep_freed_memory() is False
