"""The cleaning family: the paper's rule, leave-one-out k, rounds, the contamination estimate, the adaptive rule,
bad input, and the sharded twin on 4 simulated CPU devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dn2_jax.cleaning import (
    CLEAN_RULES,
    DEFAULT_CLEAN,
    MIN_ESTIMATE_ROWS,
    CleanResult,
    clean_bank,
    estimate_contamination,
)
from dn2_jax.errors import DN2Error
from dn2_jax.knn import clean, keep_lowest, knn_score, self_knn_score

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import _env  # noqa: E402


def _contaminated(n: int = 400, ratio: float = 0.1, d: int = 8, clumps: bool = False, seed: int = 0):
    """A dense normal cluster plus round(ratio * n) contaminants spread far and wide (known truth).

    clumps=True makes the contaminants come in near-duplicate triples, which leave-one-out k = 2 cannot see."""
    rng = np.random.default_rng(seed)
    n_bad = int(round(ratio * n))
    normal = rng.normal(size=(n - n_bad, d))
    if clumps:
        third = rng.normal(size=((n_bad + 2) // 3, d)) * 6
        bad = np.repeat(third, 3, axis=0)[:n_bad] + 0.01 * rng.normal(size=(n_bad, d))
    else:
        bad = rng.normal(size=(n_bad, d)) * 6
    x = np.concatenate([normal, bad]).astype(np.float32)
    perm = rng.permutation(n)
    return x[perm], (np.arange(n) >= n - n_bad)[perm]


def test_rule_names():
    assert {"none", "paper"} <= set(CLEAN_RULES) and DEFAULT_CLEAN in CLEAN_RULES


def test_none_keeps_everything():
    x, _ = _contaminated()
    res = clean_bank(x, "none")
    assert isinstance(res, CleanResult) and res.contamination is None
    np.testing.assert_array_equal(res.keep, np.arange(len(x)))
    assert res.keep.dtype == np.int64 and res.loo_scores.shape == (len(x),) and np.isnan(res.loo_scores).all()


def test_paper_rule_is_dn2_jax_knn_clean():
    x, _ = _contaminated(n=101, seed=1)
    res = clean_bank(x, "paper")
    np.testing.assert_array_equal(res.keep, np.asarray(clean(x, 2, 0.5)))
    assert len(res.keep) == 101 - 50 and res.contamination is None
    np.testing.assert_allclose(res.loo_scores, np.asarray(self_knn_score(x, 2)), rtol=1e-6)


def test_leave_one_out_k_is_independent_and_sees_near_duplicate_contaminants():
    x, bad = _contaminated(ratio=0.1, clumps=True)
    paper = clean_bank(x, "paper")
    wide = clean_bank(x, "fixed", loo_k=5, fraction=0.5, rounds=1)
    np.testing.assert_array_equal(wide.keep, np.sort(np.asarray(keep_lowest(self_knn_score(x, 5), 0.5))))
    assert bad[paper.keep].sum() >= 10  # k = 2 finds two twins: most survive
    assert bad[wide.keep].sum() == 0


def test_rounds_rescore_the_kept_rows():
    x, _ = _contaminated(n=120, seed=2)
    calls = []

    def scorer(rows, k):
        calls.append(len(rows))
        return self_knn_score(rows, k)

    res = clean_bank(x, "fixed", loo_k=3, fraction=0.5, rounds=2, self_score=scorer)
    assert calls == [120, 85] and len(res.keep) == 60  # keep ceil(120 * sqrt(0.5)) = 85, then 60
    scored = ~np.isnan(res.loo_scores)
    assert scored.sum() == 85
    kept_after_1 = np.flatnonzero(scored)
    np.testing.assert_allclose(res.loo_scores[scored], np.asarray(self_knn_score(x[kept_after_1], 3)), rtol=1e-6)
    assert set(res.keep) <= set(kept_after_1)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25])
def test_contamination_estimate_on_known_contamination(ratio):
    x, bad = _contaminated(n=1000, ratio=ratio, d=8, seed=3)
    est = estimate_contamination(self_knn_score(x, 10))
    assert abs(est - ratio) <= 0.05, (est, ratio)


def test_estimate_needs_enough_rows():
    with pytest.raises(DN2Error, match=f"at least {MIN_ESTIMATE_ROWS} rows"):
        estimate_contamination(np.ones(MIN_ESTIMATE_ROWS - 1))
    x, _ = _contaminated(n=MIN_ESTIMATE_ROWS - 1)
    with pytest.raises(DN2Error, match="contamination estimate"):
        clean_bank(x, "adaptive", loo_k=2)


def test_adaptive_drops_the_estimated_contamination():
    x, bad = _contaminated(n=600, ratio=0.1, seed=4)
    res = clean_bank(x, "adaptive", loo_k=10)
    assert abs(res.contamination - 0.1) <= 0.05
    assert bad[res.keep].sum() == 0
    assert len(res.keep) >= 0.6 * len(x)  # it keeps far more than the paper's 50% ...
    clean_x = x[~bad]
    kept_clean = clean_bank(clean_x, "adaptive", loo_k=10).keep
    assert len(kept_clean) >= 0.8 * len(clean_x)  # ... and drops little from a clean bank


def test_bad_input_raises():
    x, _ = _contaminated(n=30)
    with pytest.raises(DN2Error, match="unknown cleaning rule 'median'"):
        clean_bank(x, "median")
    for f in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DN2Error, match="fraction must be in the open interval"):
            clean_bank(x, "fixed", fraction=f)
    with pytest.raises(DN2Error, match="loo_k=30 must be smaller than the bank size"):
        clean_bank(x, "paper", loo_k=30)
    with pytest.raises(DN2Error, match="rounds must be"):
        clean_bank(x, "fixed", rounds=0)
    with pytest.raises(DN2Error, match="takes no options"):
        clean_bank(x, "none", loo_k=3)
    with pytest.raises(DN2Error, match="bank must be"):
        clean_bank(x[0], "paper")


WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from _sharding_worker import bank_and_queries
    from dn2_jax.cleaning import clean_bank, sharded_clean_bank
    from dn2_jax.sharding import data_mesh, shard_bank, sharded_self_knn_score
    import jax
    assert jax.device_count() == 4
    rng = np.random.default_rng(0)
    bank = np.concatenate([bank_and_queries(n=29)[0], rng.normal(size=(30, 6)).astype(np.float32) * 5])
    sb = shard_bank(bank, data_mesh())
    out = {{}}
    for name, kw in [("paper", {{}}), ("fixed", dict(loo_k=3, fraction=0.4, rounds=3)),
                     ("adaptive", dict(loo_k=4, rounds=2))]:
        a = sharded_clean_bank(sb, name, query_chunk=7, block_size=4, **kw)
        b = clean_bank(bank, name, **kw)
        c = clean_bank(bank, name, self_score=lambda rows, k: sharded_self_knn_score(rows, k), **kw)
        for tag, r in (("sharded", a), ("ref", b), ("callable", c)):
            out[f"{{name}}_{{tag}}_keep"] = r.keep
            out[f"{{name}}_{{tag}}_loo"] = r.loo_scores
            out[f"{{name}}_{{tag}}_est"] = np.float64(np.nan if r.contamination is None else r.contamination)
    np.savez(sys.argv[1], **out)
    """
)


@pytest.mark.slow
def test_sharded_twin_on_four_devices(tmp_path):
    out = tmp_path / "clean.npz"
    code = WORKER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=_env(4), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = dict(np.load(out))
    for name in ("paper", "fixed", "adaptive"):
        for tag in ("sharded", "callable"):
            np.testing.assert_array_equal(r[f"{name}_{tag}_keep"], r[f"{name}_ref_keep"])
            np.testing.assert_allclose(r[f"{name}_{tag}_loo"], r[f"{name}_ref_loo"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r[f"{name}_{tag}_est"], r[f"{name}_ref_est"], rtol=1e-6)
    assert len(r["fixed_ref_keep"]) == 59 - int(0.4 * 59)
    assert not np.isnan(r["adaptive_ref_est"])


def test_default_leave_one_out_k_is_a_share_of_the_bank():
    from dn2_jax.cleaning import LOO_SHARE, resolve_rule

    fixed = resolve_rule("fixed")
    assert fixed.loo_k is None and resolve_rule("paper").loo_k == 2
    assert fixed.k_for(1000) == int(np.ceil(LOO_SHARE * 1000)) and fixed.k_for(5) == 2
    assert resolve_rule("fixed", loo_k=7).k_for(1000) == 7
    seen = []
    x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)

    def scorer(rows, k):
        seen.append((len(rows), k))
        return np.asarray(self_knn_score(rows, k))

    res = clean_bank(x, "fixed", self_score=scorer)  # the default rule: one round, k = 10% of 200
    assert seen == [(200, 20)] and len(res.keep) == 200 - int(np.floor(fixed.fraction * 200))


def test_detector_scores_with_the_rules_share_of_its_cleaned_bank_unless_given_a_k(tmp_path):
    from dn2_jax.cleaning import PAPER_K, resolve_rule
    from dn2_jax.detector import Detector, DetectorConfig

    assert DetectorConfig().score_k() == PAPER_K and DetectorConfig(clean="paper").score_k() == PAPER_K
    with pytest.raises(DN2Error, match="depends on the bank size"):
        DetectorConfig(clean="fixed").score_k()  # resolved from the bank the detector keeps
    assert DetectorConfig(clean="fixed", k=7).score_k() == 7
    x = np.random.default_rng(3).normal(size=(1200, 6)).astype(np.float32)
    det = Detector(backbone="pixels", clean="fixed", normalize=False).fit_features(x)
    k = resolve_rule("fixed").score_k_for(det.bank_size)
    assert det.bank_size == 1200 - int(np.floor(resolve_rule("fixed").fraction * 1200)) and det.k == k == 4
    np.testing.assert_allclose(det.calibration_scores, self_knn_score(det.bank, k), rtol=1e-5)
    np.testing.assert_allclose(det.score_features(x[:5]), knn_score(x[:5], det.bank, k), rtol=1e-5)
    det.save(tmp_path / "det")
    again = Detector.load(tmp_path / "det")
    assert again.k == k and again.config.k is None
    np.testing.assert_array_equal(again.calibration_scores, det.calibration_scores)
    given = Detector(backbone="pixels", clean="fixed", normalize=False, k=2).fit_features(x)
    assert given.k == 2
