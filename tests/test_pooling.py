"""Orderless set pooling: invariance, the paper's mean, prototype fitting, bad input."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from dn2_jax.errors import DN2Error
from dn2_jax.knn import pool_groups
from dn2_jax.pooling import (
    DEFAULT_POOL,
    MAX_COMP_SET,
    SET_POOLS,
    SetPool,
    composition_probs,
    compositions,
    fit_set_pool,
    kmeans,
)


def _data(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32)


def test_pool_names():
    assert "mean" in SET_POOLS and DEFAULT_POOL in SET_POOLS
    assert any("+" in p for p in SET_POOLS) and "hist" in SET_POOLS


@pytest.mark.parametrize("pool", SET_POOLS)
def test_permutation_invariance_on_random_sets(pool):
    x = _data()
    rng = np.random.default_rng(1)
    groups = np.stack([rng.choice(len(x), 5, replace=False) for _ in range(11)])
    sp = fit_set_pool(x, pool, prototypes=4, sets=groups)  # 'comp' is fitted on sets; the others ignore them
    ref = np.asarray(sp(x, groups))
    assert ref.dtype == np.float32 and ref.shape[0] == 11 and np.isfinite(ref).all()
    for _ in range(3):
        perm = np.stack([rng.permutation(g) for g in groups])
        np.testing.assert_allclose(np.asarray(sp(x, perm)), ref, rtol=1e-5, atol=1e-6)
    # ... and it is not a constant: different sets give different features.
    assert np.abs(ref[0] - ref[1]).max() > 1e-4


def test_mean_pool_equals_the_papers():
    x = _data()
    groups = np.random.default_rng(2).integers(0, len(x), size=(9, 3))
    out = np.asarray(fit_set_pool(x, "mean")(x, groups))
    np.testing.assert_array_equal(out, np.asarray(pool_groups(x[groups])))


def test_output_dimensions_and_concatenation_parts_are_unit_norm():
    x = _data(d=6)
    groups = np.arange(12).reshape(4, 3)
    dims = {"mean": 6, "std": 6, "max": 6, "hist": 5, "mean+hist": 11, "mean+std": 12, "mean+hist+std": 17,
            "comp": 10}
    for pool, dim in dims.items():
        assert fit_set_pool(x, pool, prototypes=5, sets=groups)(x, groups).shape == (4, dim), pool
    out = np.asarray(fit_set_pool(x, "mean+hist", prototypes=5)(x, groups))
    np.testing.assert_allclose(np.linalg.norm(out[:, :6], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[:, 6:], axis=1), 1.0, rtol=1e-5)


def test_histogram_is_a_distribution_and_separates_compositions():
    # Three tight clusters; a prototype per cluster. A set with one image of each cluster and a set with
    # cluster 0 twice and cluster 2 missing get different histograms; the mean of the histogram is 1/P.
    rng = np.random.default_rng(3)
    centres = np.eye(4, dtype=np.float32)[:3] * 10
    x = np.concatenate([c + 0.1 * rng.normal(size=(20, 4)) for c in centres]).astype(np.float32)
    sp = fit_set_pool(x, "hist", prototypes=3, seed=0)
    a = np.asarray(sp.assignments(x))
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-5)
    assert (a.max(1) > 0.9).all()  # each image sits with one prototype
    h = np.asarray(sp(x, np.array([[0, 20, 40], [0, 1, 20]])))
    np.testing.assert_allclose(np.sort(h[0]), [1 / 3] * 3, atol=0.05)
    np.testing.assert_allclose(np.sort(h[1]), [0, 1 / 3, 2 / 3], atol=0.05)


def test_prototype_fitting_is_deterministic_for_a_seed():
    x = _data(n=80)
    a = np.asarray(fit_set_pool(x, "hist", prototypes=6, seed=7).prototypes)
    b = np.asarray(fit_set_pool(x, "hist", prototypes=6, seed=7).prototypes)
    c = np.asarray(fit_set_pool(x, "hist", prototypes=6, seed=8).prototypes)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(4, 5)).astype(np.float32) * 20
    x = np.concatenate([c + rng.normal(size=(25, 5)) for c in centres]).astype(np.float32)
    found = np.asarray(kmeans(x, 4, seed=0))
    dist = np.linalg.norm(found[:, None] - centres[None], axis=2)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3] and dist.min(1).max() < 1.0


def test_set_pool_is_a_pytree_usable_under_jit():
    x = _data()
    sp = fit_set_pool(x, "mean+hist", prototypes=4)
    leaves, treedef = jax.tree_util.tree_flatten(sp)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, SetPool) and rebuilt.name == "mean+hist"
    groups = np.arange(9).reshape(3, 3)
    out = jax.jit(lambda p, f: p(f, groups))(sp, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(sp(x, groups)), rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
    x = _data(n=10)
    with pytest.raises(DN2Error, match="prototypes=11"):
        fit_set_pool(x, "hist", prototypes=11)
    with pytest.raises(DN2Error, match="unknown set pool 'median'"):
        fit_set_pool(x, "median")
    sp = fit_set_pool(x, "mean")
    with pytest.raises(DN2Error, match="groups index"):
        sp(x, np.array([[0, 10]]))
    with pytest.raises(DN2Error, match="groups must be"):
        sp(x, np.array([0, 1]))
    with pytest.raises(DN2Error, match="NaN"):
        fit_set_pool(np.full((4, 2), np.nan, np.float32), "mean")


def test_composition_probabilities_equal_enumerating_every_labelling():
    rng = np.random.default_rng(5)
    for m, p in ((3, 3), (4, 2), (2, 4)):
        post = rng.dirichlet(np.ones(p), size=(6, m)).astype(np.float32)
        comps = compositions(m, p)
        assert len(comps) == len(set(comps)) and all(sum(c) == m for c in comps)
        want = np.zeros((6, len(comps)))
        for labels in itertools.product(range(p), repeat=m):  # every way to label the m images
            want[:, comps.index(tuple(np.bincount(labels, minlength=p)))] += np.prod(
                post[:, np.arange(m), list(labels)], axis=1)
        got = np.asarray(composition_probs(post))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def _kinds_data(seed: int = 6, n: int = 40):
    """Three kinds, 12-d, tight clusters; normal sets hold one image of each kind, in random order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 12)) * 4
    x = np.concatenate([c + rng.normal(size=(n, 12)) for c in centres]).astype(np.float32)
    kind = np.repeat(np.arange(3), n)
    sets = np.stack([rng.permutation(np.flatnonzero(kind == j)) for j in range(3)], 1)
    return x, kind, np.stack([rng.permutation(s) for s in sets])


def test_composition_pool_learns_the_kinds_of_normal_sets_and_sees_a_doubled_kind():
    x, kind, sets = _kinds_data()
    sp = fit_set_pool(x, "comp", sets=sets, seed=0)
    post = np.asarray(sp.assignments(x))
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-5)
    found = post.argmax(1)
    assert all(len(set(found[kind == j])) == 1 for j in range(3)) and len(set(found)) == 3  # kinds = clusters
    one_each = compositions(3, 3).index((1, 1, 1))
    normal = np.asarray(sp(x, sets))
    assert normal.shape == (len(sets), 10) and (normal[:, one_each] > 0.99).all()
    doubled = np.stack([np.flatnonzero(kind == 0)[:5], np.flatnonzero(kind == 0)[5:10],
                        np.flatnonzero(kind == 2)[:5]], 1)  # kind 0 twice, kind 1 missing
    assert (np.asarray(sp(x, doubled))[:, one_each] < 0.01).all()
    assert sp.score_k(1000) == 50 and sp.score_k(40) == 2 and sp.score_k(3) == 2
    assert fit_set_pool(x, "hist", prototypes=3).score_k(1000) == 2


def test_composition_pool_is_deterministic_for_a_seed():
    x, _, sets = _kinds_data(seed=7)
    a, b = (fit_set_pool(x, "comp", sets=sets, seed=3) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(a.coef), np.asarray(b.coef))
    np.testing.assert_array_equal(np.asarray(a(x, sets)), np.asarray(b(x, sets)))


def test_composition_pool_bad_input_raises():
    x, _, sets = _kinds_data()
    with pytest.raises(DN2Error, match="pass sets"):
        fit_set_pool(x, "comp")
    too_big = np.arange(7 * 10).reshape(10, 7)
    with pytest.raises(DN2Error, match=f"2 to {MAX_COMP_SET} images"):
        fit_set_pool(x, "comp", sets=too_big)
    with pytest.raises(DN2Error, match="sets index"):
        fit_set_pool(x, "comp", sets=sets + len(x))
    with pytest.raises(DN2Error, match="at least 2 normal train sets"):
        fit_set_pool(x, "comp", sets=sets[:1])
    with pytest.raises(DN2Error, match="sets must be"):
        fit_set_pool(x, "comp", sets=sets.astype(np.float32))
    sp = fit_set_pool(x, "comp", sets=sets)
    with pytest.raises(DN2Error, match="sets of 3 images, got sets of 2"):
        sp(x, sets[:, :2])
