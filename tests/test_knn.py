"""DN2 math against an independent float64 NumPy brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import dn2_jax as dn2
from dn2_jax.knn import max_feature_magnitude


def brute_sq_dists(queries, bank):
    q = np.asarray(queries, np.float64)
    b = np.asarray(bank, np.float64)
    return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def assert_same_neighbours(got_d, got_i, ref, k, rtol=1e-5):
    """Distances equal the k smallest reference distances; indices are a valid choice among ties."""
    got_d, got_i = np.asarray(got_d, np.float64), np.asarray(got_i)
    want = np.sort(ref, axis=1)[:, :k]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got_d, want, rtol=rtol, atol=rtol * scale)
    assert (np.diff(got_d, axis=1) >= 0).all(), "distances must ascend"
    for row in range(got_i.shape[0]):
        assert len(set(got_i[row].tolist())) == k, "indices must be distinct"
        # each returned index's true distance equals the reported one (within tolerance): ties may swap.
        np.testing.assert_allclose(ref[row, got_i[row]], got_d[row], rtol=rtol, atol=rtol * scale)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(203, 24)).astype(np.float32)
    bank[7] = bank[3]  # exact duplicates
    bank[50:60] = bank[40]  # a pile of identical points: ties
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    queries[5] = bank[40]  # a query exactly on the tied pile
    return queries, bank


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("block_size,query_block", [(4096, 1024), (64, 10), (50, 37), (1, 1)])
def test_knn_matches_brute_force(data, k, block_size, query_block):
    queries, bank = data
    d, i = dn2.knn(queries, bank, k, block_size=block_size, query_block=query_block)
    assert d.shape == i.shape == (queries.shape[0], k)
    assert d.dtype == jnp.float32 and i.dtype == jnp.int32
    assert_same_neighbours(d, i, brute_sq_dists(queries, bank), k)


def test_knn_k_equals_n_returns_whole_bank_sorted(data):
    queries, bank = data
    bank = bank[:19]
    d, i = dn2.knn(queries, bank, 19, block_size=8)
    assert_same_neighbours(d, i, brute_sq_dists(queries, bank), 19)
    assert (np.sort(np.asarray(i), axis=1) == np.arange(19)).all()


def test_ties_prefer_lower_index():
    bank = np.zeros((6, 3), np.float32)
    _, i = dn2.knn(np.zeros((1, 3), np.float32), bank, 3, block_size=4)
    assert np.asarray(i).tolist() == [[0, 1, 2]]


def test_clamps_negative_rounding_to_zero():
    rng = np.random.default_rng(1)
    bank = (rng.normal(size=(50, 64)) * 1e3).astype(np.float32)
    d, _ = dn2.knn(bank, bank, 1)
    assert (np.asarray(d) >= 0).all()
    # the expansion cancels ||b||^2 ~ 6e7 against itself: what is left is float32 rounding of that scale
    scale = float((bank.astype(np.float64) ** 2).sum(1).max())
    assert np.asarray(d).max() <= 8 * np.finfo(np.float32).eps * scale


def test_bfloat16_inputs_accumulate_in_float32(data):
    queries, bank = data
    qb, bb = jnp.asarray(queries, jnp.bfloat16), jnp.asarray(bank, jnp.bfloat16)
    d, i = dn2.knn(qb, bb, 3, block_size=64)
    assert d.dtype == jnp.float32
    # exact against the brute force on the bf16-rounded values
    ref = brute_sq_dists(np.asarray(qb.astype(jnp.float32)), np.asarray(bb.astype(jnp.float32)))
    assert_same_neighbours(d, i, ref, 3)


def test_jit_and_eager_agree(data):
    queries, bank = data
    eager = dn2.knn_score(queries, bank, 2, block_size=64)
    jitted = jax.jit(lambda q, b: dn2.knn_score(q, b, 2, block_size=64))(queries, bank)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_vmap_over_a_batch_of_query_sets(data):
    queries, bank = data
    stacked = jnp.stack([queries, queries[::-1]])
    out = jax.vmap(lambda q: dn2.knn_score(q, bank, 2))(stacked)
    np.testing.assert_allclose(out[0], dn2.knn_score(queries, bank, 2), rtol=1e-6)
    np.testing.assert_allclose(out[1], dn2.knn_score(queries[::-1], bank, 2), rtol=1e-6)


def test_knn_score_is_mean_of_k_smallest(data):
    queries, bank = data
    ref = np.sort(brute_sq_dists(queries, bank), axis=1)[:, :2].mean(1)
    np.testing.assert_allclose(dn2.knn_score(queries, bank), ref, rtol=1e-5, atol=1e-4)


def test_self_score_excludes_by_index_so_duplicates_count(data):
    _, bank = data
    scores = np.asarray(dn2.self_knn_score(bank, k=1, block_size=16))
    ref = brute_sq_dists(bank, bank)
    np.fill_diagonal(ref, np.inf)
    np.testing.assert_allclose(scores, ref.min(1), rtol=1e-5, atol=1e-4)
    assert scores[3] == 0.0 and scores[7] == 0.0  # exact duplicates are each other's neighbour
    k2 = np.asarray(dn2.self_knn_score(bank, k=2, block_size=16))
    np.testing.assert_allclose(k2, np.sort(ref, axis=1)[:, :2].mean(1), rtol=1e-5, atol=1e-4)


def test_self_score_with_k_equal_n_minus_one():
    bank = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
    ref = brute_sq_dists(bank, bank)
    np.fill_diagonal(ref, np.nan)
    np.testing.assert_allclose(dn2.self_knn_score(bank, k=8), np.nanmean(ref, axis=1), rtol=1e-5)


def test_knn_chunks_equals_knn_on_concatenation(data):
    queries, bank = data
    chunks = [(0, bank[:2]), (2, bank[2:90]), (90, bank[90:])]  # first chunk smaller than k
    d, i = dn2.knn_chunks(queries, chunks, 5, block_size=32)
    assert_same_neighbours(d, i, brute_sq_dists(queries, bank), 5)


def test_clean_removes_planted_outliers():
    rng = np.random.default_rng(3)
    inliers = rng.normal(size=(180, 16)).astype(np.float32)
    signs = rng.choice([-1, 1], size=(20, 16))
    outliers = (rng.normal(size=(20, 16)) * 0.5 + 12.0 * signs).astype(np.float32)
    bank = np.concatenate([inliers, outliers])
    perm = rng.permutation(len(bank))
    bank, is_outlier = bank[perm], perm >= 180
    kept = np.asarray(dn2.clean(bank, k=2, fraction=0.5))
    assert kept.shape == (100,)
    assert (np.diff(kept) > 0).all()
    assert not is_outlier[kept].any()
    kept_small = np.asarray(dn2.clean(bank, k=2, fraction=0.1))
    assert set(np.flatnonzero(~is_outlier)) == set(kept_small.tolist())


def test_threshold_hits_target_fpr_on_training_scores():
    bank = np.random.default_rng(4).normal(size=(400, 8)).astype(np.float32)
    t = float(dn2.threshold(bank, k=2, fpr=0.05))
    loo = np.asarray(dn2.self_knn_score(bank, 2))
    assert np.mean(loo > t) <= 0.05
    assert np.mean(loo >= t) > 0.05 - 1 / 400
    far = bank[:5] + 50.0
    assert (np.asarray(dn2.knn_score(far, bank, 2)) > t).all()


def test_pool_groups_is_orderless_mean_and_ragged_forms_agree():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(4, 3, 6)).astype(np.float32)
    pooled = np.asarray(dn2.pool_groups(feats))
    np.testing.assert_allclose(pooled, feats.mean(1), rtol=1e-6)
    np.testing.assert_allclose(dn2.pool_groups(feats[:, ::-1]), pooled, rtol=1e-6, atol=1e-6)
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
    masked = np.asarray(dn2.pool_groups(feats, mask=mask))
    flat = feats[mask]
    ids = np.repeat(np.arange(4), mask.sum(1))
    by_id = np.asarray(dn2.pool_groups_by_id(flat, ids, 4))
    want = np.stack([feats[g][mask[g]].mean(0) for g in range(4)])
    np.testing.assert_allclose(masked, want, rtol=1e-6)
    np.testing.assert_allclose(by_id, want, rtol=1e-6)


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(6)
    scores = rng.integers(0, 6, size=500).astype(np.float32)
    labels = rng.integers(0, 2, size=500)
    np.testing.assert_allclose(float(dn2.roc_auc(scores, labels)), roc_auc_score(labels, scores), rtol=1e-6)
    jitted = jax.jit(dn2.metrics._roc_auc)(jnp.asarray(scores), jnp.asarray(labels))
    np.testing.assert_allclose(float(jitted), roc_auc_score(labels, scores), rtol=1e-6)
    assert float(dn2.roc_auc(np.arange(4.0), np.array([0, 0, 1, 1]))) == 1.0


# ---------------------------------------------------------------------------------------------- bad input
GOOD = np.ones((4, 3), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: dn2.knn(GOOD, GOOD, 0), "k must be >= 1"),
        (lambda: dn2.knn(GOOD, GOOD, 5), "larger than the bank size"),
        (lambda: dn2.knn(GOOD, GOOD, 2.0), "integer"),
        (lambda: dn2.self_knn_score(GOOD, 4), "minus one"),
        (lambda: dn2.clean(GOOD, 4), "minus one"),
        (lambda: dn2.threshold(GOOD, 4), "minus one"),
        (lambda: dn2.knn(np.ones((2, 5), np.float32), GOOD, 1), "feature dimension"),
        (lambda: dn2.knn(GOOD, np.ones((0, 3), np.float32), 1), "bank is empty"),
        (lambda: dn2.knn(np.ones((0, 3), np.float32), GOOD, 1), "queries is empty"),
        (lambda: dn2.knn(np.array([[np.nan, 0, 0]], np.float32), GOOD, 1), "NaN or Inf"),
        (lambda: dn2.knn_score(GOOD, np.full((4, 3), np.inf, np.float32)), "NaN or Inf"),
        (lambda: dn2.knn(np.ones(3, np.float32), GOOD, 1), "rank 2"),
        (lambda: dn2.knn(GOOD, np.ones((2, 2, 3), np.float32), 1), "rank 2"),
        (lambda: dn2.clean(GOOD, 1, fraction=0.0), r"fraction must be in the open interval"),
        (lambda: dn2.clean(GOOD, 1, fraction=1.0), r"fraction must be in the open interval"),
        (lambda: dn2.threshold(GOOD, 1, fpr=1.5), r"fpr must be in the open interval"),
        (lambda: dn2.pool_groups(GOOD), "rank 3"),
        (lambda: dn2.pool_groups_by_id(GOOD, np.zeros(3, int), 1), "match features"),
        (lambda: dn2.pool_groups_by_id(GOOD, np.array([0, 0, 2, 2]), 3), r"set\(s\) \[1\]"),
        (lambda: dn2.pool_groups(np.ones((2, 2, 3)), mask=np.ones((2, 3), bool)), "mask must have shape"),
        (lambda: dn2.roc_auc(np.ones(3), np.ones(3)), "both normal"),
        (lambda: dn2.roc_auc(np.array([0.0, np.nan]), np.array([0, 1])), "NaN"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("k", [2, 10])
def test_two_stage_block_selection_on_larger_banks_with_ties(k):
    """Banks large enough for the grouped selection path (block 512 = 32 groups of 16), duplicates and ties."""
    rng = np.random.default_rng(7)
    bank = rng.integers(-3, 4, size=(1500, 8)).astype(np.float32)  # small integer grid: many exact ties
    bank[100:140] = bank[5]
    queries = np.concatenate([bank[:20], rng.integers(-3, 4, size=(43, 8)).astype(np.float32)])
    ref = brute_sq_dists(queries, bank)
    d, i = dn2.knn(queries, bank, k, block_size=512, query_block=32)
    assert_same_neighbours(d, i, ref, k)
    # ties resolve to the lower index, as a stable sort of the reference would
    want_i = np.argsort(ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(i), want_i)
    loo = np.asarray(dn2.self_knn_score(bank, k, block_size=512, query_block=64))
    np.fill_diagonal(ref_self := brute_sq_dists(bank, bank), np.inf)
    np.testing.assert_allclose(loo, np.sort(ref_self, axis=1)[:, :k].mean(1), rtol=1e-6, atol=1e-6)


def test_l2_normalize_and_score_helpers():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], np.float32)
    np.testing.assert_allclose(dn2.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    scores = np.array([0.5, 3.0, 0.5, 9.0, 1.0], np.float32)
    np.testing.assert_array_equal(dn2.keep_lowest(scores, 0.4), [0, 2, 4])  # drops floor(0.4 * 5) = 2
    assert float(dn2.fpr_quantile(scores, 0.25)) == 3.0  # at most 25% of the scores lie strictly above
    with pytest.raises(dn2.DN2Error, match="fraction"):
        dn2.keep_lowest(scores, 0.0)


# ------------------------------------------------------------------------------------- centering precision
def _offset_data(offset, n=400, m=300, d=64):
    rng = np.random.default_rng(8)
    bank = (rng.normal(size=(n, d)) + offset).astype(np.float32)
    queries = (rng.normal(size=(m, d)) + offset).astype(np.float32)
    return queries, bank


def _assert_exact_as_float64(d, i, queries, bank, k, rtol=1e-5):
    ref = brute_sq_dists(queries, bank)
    want_i = np.argsort(ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(i), want_i)
    want = np.take_along_axis(ref, want_i, axis=1)
    assert np.abs(np.asarray(d, np.float64) / want - 1).max() < rtol


@pytest.mark.parametrize("offset", [100.0, 1e3])
def test_shared_offset_keeps_float32_precision(offset):
    queries, bank = _offset_data(offset)
    d, i = dn2.knn(queries, bank, 3, block_size=128, query_block=64)
    _assert_exact_as_float64(d, i, queries, bank, 3)
    # The test is sensitive: without centering (centre 0), the same search loses precision.
    d0, _ = dn2.knn(queries, bank, 3, center=np.zeros(bank.shape[1], np.float32))
    ref = np.sort(brute_sq_dists(queries, bank), axis=1)[:, :3]
    assert np.abs(np.asarray(d0, np.float64) / ref - 1).max() > 1e-4
    # Streamed chunks share one centre (the first chunk's mean), leave-one-out too.
    chunks = [(0, bank[:150]), (150, bank[150:])]
    _assert_exact_as_float64(*dn2.knn_chunks(queries, chunks, 3, block_size=64), queries, bank, 3)
    loo = np.asarray(dn2.self_knn_score(bank, 2), np.float64)
    ref_self = brute_sq_dists(bank, bank)
    np.fill_diagonal(ref_self, np.inf)
    np.testing.assert_allclose(loo, np.sort(ref_self, axis=1)[:, :2].mean(1), rtol=1e-5)


def test_precomputed_centre_and_norms_give_the_same_result(data):
    queries, bank = data
    c = dn2.bank_center(bank)
    assert c.shape == (24,) and c.dtype == jnp.float32
    d0, i0 = dn2.knn(queries, bank, 3)
    d1, i1 = dn2.knn(queries, bank, 3, center=c, bank_sq_norms=dn2.squared_norms(bank, c))
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(d0, d1)
    # any centre gives the same distances up to rounding
    d2, i2 = dn2.knn(queries, bank, 3, center=np.full(24, 0.5, np.float32))
    np.testing.assert_array_equal(i0, i2)
    np.testing.assert_allclose(d0, d2, rtol=1e-5, atol=1e-5)
    with pytest.raises(dn2.DN2Error, match="center must have shape"):
        dn2.knn(queries, bank, 3, center=np.zeros(5, np.float32))


# ------------------------------------------------------------------------------------ exclude and overflow
def test_exclude_accepts_a_list_and_refuses_bad_rows(data):
    queries, bank = data
    m, n = len(queries), len(bank)
    rows = [int(r) for r in np.arange(m) * 3]
    as_list = dn2.knn(queries, bank, 2, exclude=rows)
    as_array = dn2.knn(queries, bank, 2, exclude=np.asarray(rows))
    np.testing.assert_array_equal(as_list[1], as_array[1])
    assert not (np.asarray(as_list[1]) == np.asarray(rows)[:, None]).any()
    none = dn2.knn(queries, bank, 2, exclude=[-1] * m)
    np.testing.assert_array_equal(none[1], dn2.knn(queries, bank, 2)[1])
    # 2**32 would wrap to 0 in int32 and exclude row 0; n is one past the last row; -2 is not "none".
    for bad in (np.full(m, n), np.full(m, -2), np.full(m, 2**32, np.int64), np.zeros(m, np.float32),
                np.zeros(m, bool), [0.5] * m, np.zeros(m + 1, np.int32)):
        with pytest.raises(dn2.DN2Error, match="exclude must"):
            dn2.knn(queries, bank, 2, exclude=bad)


def test_exclude_is_checked_for_shape_only_under_jit(data):
    queries, bank = data
    m = len(queries)
    jitted = jax.jit(lambda e: dn2.knn(queries, bank, 2, exclude=e)[1])(jnp.arange(m, dtype=jnp.int32))
    np.testing.assert_array_equal(jitted, dn2.knn(queries, bank, 2, exclude=np.arange(m))[1])


@pytest.mark.parametrize("which", ["queries", "bank"])
def test_values_whose_squares_overflow_float32_are_refused(data, which):
    queries, bank = data
    big = {"queries": queries, "bank": bank}
    big[which] = big[which] * np.float32(1e30)
    with pytest.raises(dn2.DN2Error, match=f"{which} has values up to .*overflow float32"):
        dn2.knn(big["queries"], big["bank"], 2)
    with pytest.raises(dn2.DN2Error, match="overflow float32"):  # device arrays are checked on device
        dn2.knn(jnp.asarray(big["queries"]), jnp.asarray(big["bank"]), 2)
    # just under the limit: finite, correct distances
    scale = np.float32(0.9 * max_feature_magnitude(24) / np.abs(np.concatenate([queries, bank])).max())
    d, i = dn2.knn(queries * scale, bank * scale, 2)
    assert np.isfinite(np.asarray(d)).all()
    np.testing.assert_array_equal(i, dn2.knn(queries, bank, 2)[1])
