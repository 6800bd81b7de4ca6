"""Evaluation protocols of DN2 as pure index logic on label arrays: no images, no models.

Every function is deterministic given `seed` (numpy `default_rng`) and returns int64 indices into the label
arrays it was given. Anomaly labels are int64: 1 = anomalous, 0 = normal.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dn2_jax.errors import DN2Error


class OneClassSplit(NamedTuple):
    bank: np.ndarray  # (B,) indices into the train labels: the normal images the kNN bank is built from.
    test: np.ndarray  # (T,) indices into the test labels, sorted.
    test_anomaly: np.ndarray  # (T,) 1 where the test image is anomalous.


class ContaminatedBank(NamedTuple):
    bank: np.ndarray  # (n,) indices into the train labels, sorted.
    contaminant: np.ndarray  # (n,) bool, True where bank[i] is from another class.


class Groups(NamedTuple):
    sets: np.ndarray  # (G, M) indices into the labels; row g is one set of M images.
    anomaly: np.ndarray  # (G,) 1 where the set is anomalous.


def _labels(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DN2Error(f"{name} must be a 1-D array of non-negative integer labels, got {labels.dtype} "
                       f"{labels.shape}")
    return labels.astype(np.int64)


def _check_class(c: int, n_classes: int, name: str) -> int:
    if not (isinstance(c, int | np.integer) and 0 <= c < n_classes):
        raise DN2Error(f"{name}={c!r} is out of range: the labels have classes 0..{n_classes - 1}")
    return int(c)


def _check_size(size: int | None, available: int, name: str, what: str) -> int:
    if size is None:
        return available
    if not (isinstance(size, int | np.integer) and 0 < size <= available):
        raise DN2Error(f"{name}={size!r} must be in [1, {available}] ({available} {what})")
    return int(size)


def _subsample(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` of `indices` drawn without replacement, sorted."""
    return np.sort(rng.choice(indices, size, replace=False)) if size < len(indices) else np.sort(indices)


def stratified_subsample(labels, size: int, *, seed: int = 0) -> np.ndarray:
    """`size` indices of `labels`, each class's share of the sample as close as possible to its share of
    the whole: class c gets floor(size·n_c/N), plus one for the classes with the largest remainders (ties to
    the lower class index). Sorted int64 (size,)."""
    labels = _labels(labels, "labels")
    size = _check_size(size, len(labels), "size", "labels")
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: size - take.sum()]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([_subsample(np.flatnonzero(labels == c), k, rng)
                                   for c, k in zip(classes, take, strict=True)]))


def one_class(train_labels, test_labels, normal_class: int, *, bank_size: int | None = None,
              test_size: int | None = None, n_classes: int | None = None, seed: int = 0) -> OneClassSplit:
    """Unimodal protocol: the bank is the train images of `normal_class` (a random `bank_size` of them if
    given); the test set is every test image (a class-stratified random `test_size` of them if given),
    anomalous when its class differs. n_classes defaults to 1 + the largest label."""
    train, test = _labels(train_labels, "train_labels"), _labels(test_labels, "test_labels")
    n_classes = n_classes or int(max(train.max(initial=-1), test.max(initial=-1))) + 1
    c = _check_class(normal_class, n_classes, "normal_class")
    normal = np.flatnonzero(train == c)
    rng_bank, rng_test = np.random.default_rng(seed).spawn(2)
    bank = _subsample(normal, _check_size(bank_size, len(normal), "bank_size", f"train images of class {c}"),
                      rng_bank)
    if test_size is None:
        test_idx = np.arange(len(test))
    else:
        test_size = _check_size(test_size, len(test), "test_size", "test images")
        test_idx = stratified_subsample(test, test_size, seed=int(rng_test.integers(2**31)))
    return OneClassSplit(bank, test_idx, (test[test_idx] != c).astype(np.int64))


def contaminated_bank(train_labels, normal_class: int, ratio: float, *, bank_size: int | None = None,
                      n_classes: int | None = None, seed: int = 0) -> ContaminatedBank:
    """Unsupervised protocol: a bank of n = `bank_size` images (default: the number of train images of
    `normal_class`) of which exactly round(ratio·n) are drawn uniformly from the other classes and the rest
    from `normal_class`. ratio must be in [0, 1)."""
    train = _labels(train_labels, "train_labels")
    c = _check_class(normal_class, n_classes or int(train.max(initial=-1)) + 1, "normal_class")
    if not (isinstance(ratio, float | int | np.floating) and 0 <= ratio < 1):
        raise DN2Error(f"contamination ratio={ratio!r} must be in [0, 1)")
    normal, others = np.flatnonzero(train == c), np.flatnonzero(train != c)
    n = len(normal) if bank_size is None else _check_size(bank_size, len(train), "bank_size", "train images")
    n_bad = int(round(ratio * n))
    if n - n_bad > len(normal) or n_bad > len(others):
        raise DN2Error(f"bank_size={n} with ratio={ratio} needs {n - n_bad} images of class {c} and {n_bad} "
                       f"of other classes; there are {len(normal)} and {len(others)}")
    rng = np.random.default_rng(seed)
    bank = np.concatenate([_subsample(normal, n - n_bad, rng), _subsample(others, n_bad, rng)])
    order = np.argsort(bank)
    return ContaminatedBank(bank[order], (train[bank] != c)[order])


def make_groups(labels, group_classes, n_normal: int, n_anomalous: int, *, seed: int = 0) -> Groups:
    """Group anomaly detection sets of M = len(group_classes) images drawn from `labels`.

    Rule: a normal set holds one image of each class in `group_classes` (in that order). An anomalous set
    holds M images of the same classes in a different composition: one class `a` is missing and another
    class `b` != a appears twice (two distinct images), (a, b) drawn uniformly at random among ordered
    pairs of distinct chosen classes; so every image in it is individually normal. Within a set images are
    distinct; across sets they are drawn independently (an image may appear in several sets). Rows are the
    n_normal normal sets followed by the n_anomalous anomalous ones. Train and test sets come from the train
    and test splits (disjoint pools): see `train_test_groups`.
    """
    labels = _labels(labels, "labels")
    classes = [int(c) for c in group_classes]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise DN2Error(f"group_classes={list(group_classes)} must be at least 2 distinct classes")
    pools = []
    for c in classes:
        pool = np.flatnonzero(labels == _check_class(c, int(labels.max(initial=-1)) + 1, "group_classes"))
        if len(pool) < 2:
            raise DN2Error(f"group class {c} has {len(pool)} images; at least 2 are needed")
        pools.append(pool)
    for name, n in (("n_normal", n_normal), ("n_anomalous", n_anomalous)):
        if not (isinstance(n, int | np.integer) and n >= 0):
            raise DN2Error(f"{name}={n!r} must be a non-negative integer")
    m, rng = len(classes), np.random.default_rng(seed)
    sets = np.empty((n_normal + n_anomalous, m), np.int64)
    for g in range(n_normal + n_anomalous):
        counts = np.ones(m, np.int64)
        if g >= n_normal:
            missing, repeated = rng.choice(m, 2, replace=False)
            counts[missing], counts[repeated] = 0, 2
        picks = [rng.choice(pool, k, replace=False) for pool, k in zip(pools, counts, strict=True)]
        sets[g] = np.concatenate(picks)
    return Groups(sets, np.repeat(np.array([0, 1], np.int64), [n_normal, n_anomalous]))


def train_test_groups(train_labels, test_labels, group_classes, n_train: int, n_test_normal: int,
                      n_test_anomalous: int, *, seed: int = 0) -> tuple[np.ndarray, Groups]:
    """Normal train sets (G_train, M) indexing `train_labels`, and test sets indexing `test_labels`, so train
    and test sets never share an image. Rule as in `make_groups`."""
    seed_train, seed_test = np.random.default_rng(seed).integers(2**31, size=2)
    train = make_groups(train_labels, group_classes, n_train, 0, seed=int(seed_train))
    test = make_groups(test_labels, group_classes, n_test_normal, n_test_anomalous, seed=int(seed_test))
    return train.sets, test


def mvtec_split(train_labels, test_labels) -> OneClassSplit:
    """MVTec AD protocol: the bank is all of train/good, every test image is scored, anomalous = not good."""
    train, test = _labels(train_labels, "train_labels"), _labels(test_labels, "test_labels")
    if train.size == 0 or train.any():
        raise DN2Error("MVTec train_labels must be all 0 (train/good only) and non-empty")
    return OneClassSplit(np.arange(len(train)), np.arange(len(test)), (test != 0).astype(np.int64))
