"""Greedy k-center coreset: equality with the NumPy reference, settings, streaming from files and chunks."""

import numpy as np
import pytest

from dn2_jax.coreset import (
    coreset_select,
    coreset_select_numpy,
    coreset_select_stream,
    coreset_size,
    iter_row_chunks,
    random_projection,
)
from dn2_jax.errors import DN2Error


def _clustered(n, d, clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32) * 4
    return centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("n, d, fraction, block", [(300, 8, 0.1, 4096), (600, 16, 0.05, 64), (200, 4, 0.5, 16)])
def test_selection_equals_numpy_reference(n, d, fraction, block):
    x = _clustered(n, d, seed=n)
    stats = {}
    got = coreset_select(x, fraction, seed=3, pruned_block=block, stats=stats)
    want = coreset_select_numpy(x, fraction, seed=3)
    assert len(got) == coreset_size(n, fraction)
    np.testing.assert_array_equal(got, want)
    assert stats["steps"] == len(got) - 1 and stats["pruned_steps"] > 0  # the pruned path ran
    if block < n // 4:
        assert stats["pruned_steps"] < stats["steps"]  # and so did the full pass


def test_max_steps_is_a_prefix():
    x = _clustered(300, 8, seed=9)
    full = coreset_select(x, 0.1, seed=1)
    np.testing.assert_array_equal(coreset_select(x, 0.1, seed=1, max_steps=7), full[:7])
    np.testing.assert_array_equal(coreset_select_numpy(x, 0.1, seed=1, max_steps=7), full[:7])


def test_selection_with_projection_equals_reference():
    x = _clustered(400, 64, seed=1)
    got = coreset_select(x, 0.05, seed=7, proj_dim=8)
    np.testing.assert_array_equal(got, coreset_select_numpy(x, 0.05, seed=7, proj_dim=8))
    assert not np.array_equal(got, coreset_select(x, 0.05, seed=7))  # the projection changes the distances


def test_greedy_property_each_pick_is_the_farthest():
    x = _clustered(250, 6, seed=2)
    sel = coreset_select(x, 0.08, seed=0)
    assert sel[0] == np.random.default_rng(0).integers(250)  # seeded start
    for i in range(1, len(sel)):
        d = ((x[:, None, :] - x[sel[:i]][None]) ** 2).sum(-1).min(1)
        assert d[sel[i]] == pytest.approx(d.max(), rel=1e-5)
    assert len(set(sel.tolist())) == len(sel)


def test_full_fraction_is_a_permutation_and_seed_matters():
    x = _clustered(40, 3, seed=4)
    assert sorted(coreset_select(x, 1.0).tolist()) == list(range(40))
    starts = {int(coreset_select(x, 0.2, seed=s)[0]) for s in range(4)}
    assert starts == {int(np.random.default_rng(s).integers(40)) for s in range(4)} and len(starts) > 1


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, 2, float("nan"), True, "0.1"])
def test_fraction_outside_unit_interval_raises(fraction):
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(DN2Error, match="fraction"):
        coreset_select(x, fraction)
    with pytest.raises(DN2Error, match="fraction"):
        coreset_select_stream(x, fraction)


def test_sizes_and_bad_banks():
    assert coreset_size(1000, 0.01) == 10 and coreset_size(100, 0.29) == 29 and coreset_size(5, 0.01) == 1
    with pytest.raises(DN2Error, match="non-empty"):
        coreset_select(np.zeros((0, 3), np.float32), 0.5)
    with pytest.raises(DN2Error, match="non-empty"):
        coreset_select(np.zeros(5, np.float32), 0.5)
    p = random_projection(10, 4, seed=0)
    assert p.shape == (10, 4) and p.dtype == np.float32
    np.testing.assert_array_equal(p, random_projection(10, 4, seed=0))


def test_stream_without_dropping_equals_in_memory(tmp_path):
    x = _clustered(500, 16, seed=5)
    path = tmp_path / "bank.npy"
    np.save(path, x)
    want = coreset_select(x, 0.1, seed=2, proj_dim=8)
    # oversample * fraction >= 1: every chunk keeps all rows, the final greedy sees the whole bank
    for source in (x, np.load(path, mmap_mode="r"), str(path), (x[s : s + 77] for s in range(0, 500, 77))):
        got = coreset_select_stream(source, 0.1, seed=2, proj_dim=8, chunk_rows=128, oversample=10)
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_stream_chunks_bounded_and_good_cover(tmp_path):
    x = _clustered(2000, 8, clusters=30, seed=6)
    mm = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    mm.flush()
    chunks = list(iter_row_chunks(mm, chunk_rows=300))
    assert [len(c) for c in chunks] == [300] * 6 + [200]
    np.testing.assert_array_equal(np.concatenate(chunks), x)
    sel = coreset_select_stream(mm, 0.02, seed=0, chunk_rows=300, oversample=3)
    assert len(sel) == 40 and len(set(sel.tolist())) == 40 and sel.min() >= 0 and sel.max() < 2000

    def radius(s):
        return np.sqrt(((x[:, None, :] - x[s][None]) ** 2).sum(-1).min(1).max())

    # composable coresets for k-center: within a small constant of the in-memory greedy's covering radius
    assert radius(sel) <= 4 * radius(coreset_select(x, 0.02, seed=0))
    with pytest.raises(DN2Error, match="chunk_rows"):
        list(iter_row_chunks(x, chunk_rows=0))
    with pytest.raises(DN2Error, match="empty"):
        coreset_select_stream(iter([]), 0.1)
