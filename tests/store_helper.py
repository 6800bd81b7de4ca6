"""Toy data and subprocess entry points for tests/test_store.py (not collected by pytest).

python store_helper.py crash PATH DELAY_S   extract_to_store with an embed_fn that sleeps DELAY_S per batch
python store_helper.py sharded PATH         extract_to_store with an embed_fn sharded over all devices
python store_helper.py read PATH OUT.npz    open_store and save its arrays and device count
"""

from __future__ import annotations

import sys
import time

import numpy as np

N, CHUNK, BATCH = 24, 4, 2
METADATA = {
    "backbone": "fake",
    "fingerprint": "ab12" * 16,
    "preset": {"size": 4, "mean": [0.5, 0.25], "name": "toy"},
    "dataset": "toy",
    "split": "train",
}


def toy_data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 4, 4, 3) uint8 images, (n,) labels, (n,) ids."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return images, rng.integers(0, 3, n), 1000 + rng.permutation(n)


def fake_embed(images: np.ndarray) -> np.ndarray:
    """(B, ...) uint8 → (B, 6) float32: pixel sum, max, min and three pixels. Integer-valued, so exact."""
    x = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    return np.concatenate([x.sum(1, keepdims=True), x.max(1, keepdims=True), x.min(1, keepdims=True), x[:, :3]], 1)


def extract_toy(path, embed_fn, n: int = N, **kw):
    """extract_to_store of toy_data(n) with METADATA; keyword arguments override the defaults."""
    from dn2_jax.store import extract_to_store

    images, labels, ids = toy_data(n)
    kw = {
        "metadata": METADATA,
        "labels": labels,
        "ids": ids,
        "chunk_size": CHUNK,
        "batch_size": BATCH,
        "progress": False,
        **kw,
    }
    return extract_to_store(path, images, embed_fn, **kw)


def _crash(path: str, delay: float) -> None:
    def slow_embed(images):
        time.sleep(delay)
        return fake_embed(images)

    extract_toy(path, slow_embed)


def _sharded(path: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert jax.device_count() == 4, jax.devices()
    batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))

    @jax.jit
    def embed(x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return jnp.concatenate([x.sum(1, keepdims=True), x.max(1, keepdims=True), x.min(1, keepdims=True), x[:, :3]], 1)

    def sharded_embed(images):
        out = embed(jax.device_put(images, batch))
        assert len(out.sharding.device_set) == 4
        return out

    extract_toy(path, sharded_embed, chunk_size=8, batch_size=4, dtype="bfloat16")


def _read(path: str, out: str) -> None:
    import jax

    from dn2_jax.store import open_store

    store = open_store(path, expect=METADATA)
    np.savez(
        out,
        embeddings=store.embeddings(dtype=None),
        labels=store.labels,
        ids=store.ids,
        device_count=jax.device_count(),
        writer_device_count=store.metadata["device_count"],
    )


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"crash": lambda p, d: _crash(p, float(d)), "sharded": _sharded, "read": _read}[mode](*args)
