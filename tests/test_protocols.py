from collections import Counter

import numpy as np
import pytest

from dn2_jax import protocols
from dn2_jax.errors import DN2Error


def _labels(counts, seed):
    """Shuffled int64 labels with counts[c] copies of class c."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


TRAIN = _labels([40, 30, 20, 25, 35], seed=1)
TEST = _labels([50, 30, 20, 10, 40], seed=2)


def test_one_class_full_bank_and_test():
    split = protocols.one_class(TRAIN, TEST, 2)
    np.testing.assert_array_equal(split.bank, np.flatnonzero(TRAIN == 2))
    np.testing.assert_array_equal(split.test, np.arange(len(TEST)))
    np.testing.assert_array_equal(split.test_anomaly, (TEST != 2).astype(int))
    assert split.test_anomaly.sum() == len(TEST) - 20


def test_one_class_subsampled_bank_and_stratified_test():
    split = protocols.one_class(TRAIN, TEST, 0, bank_size=7, test_size=30, seed=3)
    assert len(split.bank) == 7 and len(set(split.bank)) == 7
    assert (TRAIN[split.bank] == 0).all()
    assert len(split.test) == 30 and len(set(split.test)) == 30
    got = np.bincount(TEST[split.test], minlength=5)
    expected = 30 * np.bincount(TEST) / len(TEST)
    assert np.all(np.abs(got - expected) < 1), (got, expected)
    np.testing.assert_array_equal(split.test_anomaly, TEST[split.test] != 0)


def test_stratified_subsample_largest_remainder():
    labels = np.repeat([0, 1, 2], [5, 3, 2])  # size 4 -> quotas 2, 1.2, 0.8 -> 2, 1, 1.
    idx = protocols.stratified_subsample(labels, 4, seed=0)
    assert Counter(labels[idx].tolist()) == {0: 2, 1: 1, 2: 1}
    assert np.all(np.diff(idx) > 0)


def test_one_class_is_deterministic_and_seeded():
    a = protocols.one_class(TRAIN, TEST, 1, bank_size=10, test_size=20, seed=5)
    b = protocols.one_class(TRAIN, TEST, 1, bank_size=10, test_size=20, seed=5)
    c = protocols.one_class(TRAIN, TEST, 1, bank_size=10, test_size=20, seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not (np.array_equal(a.bank, c.bank) and np.array_equal(a.test, c.test))


@pytest.mark.parametrize("kwargs", [dict(normal_class=5), dict(normal_class=-1), dict(normal_class=1.5),
                                    dict(normal_class=0, bank_size=41), dict(normal_class=0, bank_size=0),
                                    dict(normal_class=0, test_size=151), dict(normal_class=3, n_classes=3)])
def test_one_class_bad_arguments_raise(kwargs):
    with pytest.raises(DN2Error, match="normal_class|bank_size|test_size"):
        protocols.one_class(TRAIN, TEST, **kwargs)


def test_bad_label_arrays_raise():
    with pytest.raises(DN2Error, match="train_labels"):
        protocols.one_class(TRAIN.astype(float), TEST, 0)
    with pytest.raises(DN2Error, match="test_labels"):
        protocols.one_class(TRAIN, TEST.reshape(-1, 5), 0)


@pytest.mark.parametrize("ratio,bank_size", [(0.0, None), (0.1, None), (0.25, 20), (0.5, 11), (0.95, 40)])
def test_contaminated_bank_fraction_is_exact(ratio, bank_size):
    bank = protocols.contaminated_bank(TRAIN, 3, ratio, bank_size=bank_size, seed=0)
    n = bank_size or int((TRAIN == 3).sum())
    assert len(bank.bank) == n and len(np.unique(bank.bank)) == n
    assert bank.contaminant.sum() == round(ratio * n)
    assert (TRAIN[bank.bank[bank.contaminant]] != 3).all()
    assert (TRAIN[bank.bank[~bank.contaminant]] == 3).all()


def test_contaminated_bank_is_deterministic():
    a = protocols.contaminated_bank(TRAIN, 1, 0.2, seed=4)
    b = protocols.contaminated_bank(TRAIN, 1, 0.2, seed=4)
    c = protocols.contaminated_bank(TRAIN, 1, 0.2, seed=9)
    np.testing.assert_array_equal(a.bank, b.bank)
    assert not np.array_equal(a.bank, c.bank)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), "0.1"])
def test_contamination_ratio_outside_unit_interval_raises(ratio):
    with pytest.raises(DN2Error, match="ratio"):
        protocols.contaminated_bank(TRAIN, 0, ratio)


def test_contaminated_bank_bad_sizes_raise():
    with pytest.raises(DN2Error, match="bank_size"):
        protocols.contaminated_bank(TRAIN, 2, 0.1, bank_size=30)  # needs 27 of class 2, which has 20.
    with pytest.raises(DN2Error, match="bank_size=0"):
        protocols.contaminated_bank(TRAIN, 2, 0.1, bank_size=0)
    with pytest.raises(DN2Error, match="normal_class"):
        protocols.contaminated_bank(TRAIN, 7, 0.1)


def test_groups_normal_and_anomalous_composition():
    chosen = [0, 2, 4]
    groups = protocols.make_groups(TEST, chosen, n_normal=30, n_anomalous=40, seed=0)
    assert groups.sets.shape == (70, 3) and groups.anomaly.tolist() == [0] * 30 + [1] * 40
    for row, anomalous in zip(groups.sets, groups.anomaly, strict=True):
        classes = Counter(TEST[row].tolist())
        assert len(set(row)) == 3  # distinct images within a set
        assert set(classes) <= set(chosen)  # every image individually normal
        if anomalous:
            assert sorted(classes.values()) == [1, 2] and len(classes) == 2  # one missing, one repeated
        else:
            assert classes == Counter(chosen)
    missing = {tuple(sorted(set(chosen) - set(TEST[r]))) for r in groups.sets[30:]}
    assert len(missing) == 3  # every class gets left out by some anomalous set


def test_groups_are_deterministic_and_train_test_pools_disjoint():
    a = protocols.make_groups(TRAIN, [1, 3], 5, 5, seed=1)
    b = protocols.make_groups(TRAIN, [1, 3], 5, 5, seed=1)
    np.testing.assert_array_equal(a.sets, b.sets)
    train_sets, test = protocols.train_test_groups(TRAIN, TEST, [0, 1, 3], 8, 6, 4, seed=0)
    assert train_sets.shape == (8, 3) and test.sets.shape == (10, 3)
    assert all(Counter(TRAIN[r].tolist()) == Counter([0, 1, 3]) for r in train_sets)
    assert train_sets.max() < len(TRAIN) and test.sets.max() < len(TEST)
    assert all(set(TEST[r]) <= {0, 1, 3} for r in test.sets)


@pytest.mark.parametrize("chosen,n_normal,match", [([0], 1, "group_classes"), ([1, 1], 1, "group_classes"),
                                                   ([0, 9], 1, "group_classes"), ([0, 1], -1, "n_normal")])
def test_groups_bad_arguments_raise(chosen, n_normal, match):
    with pytest.raises(DN2Error, match=match):
        protocols.make_groups(TRAIN, chosen, n_normal, 1)


def test_group_class_with_one_image_raises():
    with pytest.raises(DN2Error, match="class 2 has 1"):
        protocols.make_groups(np.array([0, 0, 1, 1, 2]), [0, 1, 2], 1, 1)


def test_mvtec_split():
    split = protocols.mvtec_split(np.zeros(4, int), np.array([0, 1, 1, 0, 1]))
    np.testing.assert_array_equal(split.bank, np.arange(4))
    np.testing.assert_array_equal(split.test_anomaly, [0, 1, 1, 0, 1])
    with pytest.raises(DN2Error, match="train_labels"):
        protocols.mvtec_split(np.array([0, 1]), np.array([0, 1]))
