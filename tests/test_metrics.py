"""eval.metrics: AUC/ROC against scikit-learn, the paired stratified bootstrap, the OP."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from boneaug.errors import DataError
from boneaug.eval.metrics import (
    auc_replicates,
    bootstrap_auc,
    operating_point,
    roc_auc,
    roc_curve,
    sens_spec,
    stratified_bootstrap_indices,
)


@st.composite
def labelled_scores(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes; scores either heavily tied (a few levels) or continuous."""
    n = draw(st.integers(2, 80))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    labels[draw(st.integers(0, n - 1))] = 1
    labels[(draw(st.integers(0, n - 1)) + 1) % n] = 0 if labels.sum() > 1 else labels[0]
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    if draw(st.booleans()):
        levels = draw(st.integers(1, 4))
        scores = np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))) / levels
    else:
        scores = np.array(draw(st.lists(
            st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)))
    return labels, scores


@settings(max_examples=300, deadline=None)
@given(labelled_scores())
def test_roc_auc_equals_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, scores = data
    assert abs(roc_auc(labels, scores) - roc_auc_score(labels, scores)) <= 1e-12


@settings(max_examples=300, deadline=None)
@given(labelled_scores(), st.booleans())
def test_roc_curve_points_equal_sklearn(data: tuple[np.ndarray, np.ndarray], drop: bool) -> None:
    labels, scores = data
    ours = roc_curve(labels, scores, drop_intermediate=drop)
    theirs = sk_roc_curve(labels, scores, drop_intermediate=drop)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_auc_on_a_hand_worked_tied_case() -> None:
    # pos 0.5, 0.8; neg 0.2, 0.5, 0.5: pos > neg in 1 + 3 = 4 pairs, tied in 2 -> (4 + 2/2) / 6
    labels = [1, 1, 0, 0, 0]
    scores = [0.5, 0.8, 0.2, 0.5, 0.5]
    assert roc_auc(labels, scores) == 5 / 6
    assert roc_auc([True, True, False, False, False], scores) == 5 / 6


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 0, 1], [0.1, 0.2], "scores has 2 entries but labels have 3"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "needs both classes, got 3 positive"),
        ([1, 0, 1], [0.1, np.nan, 0.3], "NaN or infinite .first at index 1"),
        ([1, 0, 2], [0.1, 0.2, 0.3], r"only 0 .no lesion. and 1 .lesion.; found \[2\]"),
        ([[1, 0]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_input_is_named(labels: object, scores: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        roc_auc(labels, scores)
    with pytest.raises(DataError, match=message):
        roc_curve(labels, scores)


# --------------------------------------------------------------------------- bootstrap


def _test_set(seed: int = 0, n_pos: int = 50, n_neg: int = 500) -> np.ndarray:
    labels = np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)]
    return np.random.default_rng(seed).permutation(labels)


def test_stratified_indices_keep_classes_and_are_reproducible() -> None:
    labels = _test_set()
    idx = stratified_bootstrap_indices(labels, 300, seed=7)
    assert idx.shape == (300, labels.size)
    # every column resamples its own class: the label vector of each replicate is unchanged
    assert (labels[idx] == labels[None, :]).all()
    assert np.array_equal(idx, stratified_bootstrap_indices(labels, 300, seed=7))
    from_rng = stratified_bootstrap_indices(labels, 300, seed=np.random.default_rng(7))
    assert np.array_equal(idx, from_rng)
    other = stratified_bootstrap_indices(labels, 300, seed=8)
    assert (idx != other).mean() > 0.9
    # it is a bootstrap: with replacement, about 1 - 1/e of the items appear in a replicate
    distinct = np.mean([np.unique(row).size / labels.size for row in idx[:50]])
    assert 0.58 < distinct < 0.68


def test_auc_replicates_equal_roc_auc_on_each_resample() -> None:
    rng = np.random.default_rng(1)
    labels = _test_set(1, 30, 120)
    scores = np.round(labels * 0.7 + rng.normal(size=labels.size), 1)  # many ties
    idx = stratified_bootstrap_indices(labels, 64, seed=3)
    reps = auc_replicates(labels, scores, idx)
    expected = [roc_auc(labels[row], scores[row]) for row in idx]
    np.testing.assert_array_equal(reps, expected)  # bit-identical
    # the identity "replicate" gives the point estimate
    identity = np.arange(labels.size)[None, :]
    assert auc_replicates(labels, scores, identity)[0] == roc_auc(labels, scores)


def test_auc_replicates_refuses_one_class_replicates() -> None:
    labels = np.array([1, 0, 0, 1])
    with pytest.raises(DataError, match="replicate 1 holds only one class"):
        auc_replicates(labels, [0.9, 0.1, 0.2, 0.8], np.array([[0, 1, 2, 3], [1, 1, 2, 2]]))


def test_bootstrap_is_reproducible_from_the_seed() -> None:
    rng = np.random.default_rng(2)
    labels = _test_set(2)
    models = {"a": labels * 1.0 + rng.normal(size=labels.size),
              "b": labels * 1.2 + rng.normal(size=labels.size)}
    first = bootstrap_auc(labels, models, n_replicates=500, seed=11, baseline="a")
    assert first == bootstrap_auc(labels, models, n_replicates=500, seed=11, baseline="a")
    other = bootstrap_auc(labels, models, n_replicates=500, seed=12, baseline="a")
    assert other["b"].ci_low != first["b"].ci_low
    assert other["b"].diff_ci_high != first["b"].diff_ci_high
    # the point estimate is on the full set
    assert other["b"].auc == first["b"].auc == roc_auc(labels, models["b"])
    # a model's CI does not depend on which other models are scored alongside it
    alone = bootstrap_auc(labels, {"b": models["b"]}, n_replicates=500, seed=11)
    assert (alone["b"].ci_low, alone["b"].ci_high) == (first["b"].ci_low, first["b"].ci_high)


def test_all_models_are_scored_on_the_same_replicates() -> None:
    rng = np.random.default_rng(3)
    labels = _test_set(3)
    scores = labels * 0.8 + rng.normal(size=labels.size)
    # identical scores, and a strictly monotone transform of them (same ranks): if the models saw
    # different resamples, their replicate AUCs would differ; on shared ones the difference is 0
    models = {"base": scores, "copy": scores.copy(), "exp": np.exp(scores)}
    idx = stratified_bootstrap_indices(labels, 2000, seed=0)
    reps = {k: auc_replicates(labels, v, idx) for k, v in models.items()}
    assert np.array_equal(reps["copy"] - reps["base"], np.zeros(2000))
    assert np.array_equal(reps["exp"] - reps["base"], np.zeros(2000))
    result = bootstrap_auc(labels, models, n_replicates=2000, seed=0, baseline="base")
    for key in ("copy", "exp"):
        r = result[key]
        assert (r.diff, r.diff_ci_low, r.diff_ci_high) == (0.0, 0.0, 0.0)
        assert not r.significant and r.p_value == 1.0
    assert result["base"].diff is None and result["base"].p_value is None


def test_paired_difference_is_significant_though_marginal_cis_overlap() -> None:
    # A consistent small improvement on highly correlated scores: the improved model is the
    # baseline plus a small push on the positives. Each model's own CI is wide (50 positives)
    # and they overlap, but the paired per-replicate difference is always positive.
    rng = np.random.default_rng(4)
    labels = _test_set(4)
    base = labels * 1.0 + rng.normal(size=labels.size)
    better = base + 0.25 * labels + 0.05 * rng.normal(size=labels.size)
    res = bootstrap_auc(labels, {"base": base, "better": better}, seed=0, baseline="base")
    b, m = res["base"], res["better"]
    assert m.auc - b.auc > 0.02
    assert m.ci_low < b.ci_high  # marginal CIs overlap ...
    assert b.ci_low < b.auc < b.ci_high and m.ci_low < m.auc < m.ci_high
    assert m.significant and m.diff_ci_low > 0  # ... yet the paired difference excludes 0
    assert m.p_value is not None and m.p_value < 0.01
    assert m.diff == pytest.approx(m.auc - b.auc, abs=1e-15)
    assert m.diff_ci_low < m.diff < m.diff_ci_high


def test_independent_noisy_models_do_not_differ_significantly() -> None:
    # Two models of the same true quality with independent noise: the difference CI includes 0.
    rng = np.random.default_rng(5)
    labels = _test_set(5)
    a = labels * 1.0 + rng.normal(size=labels.size)
    b = labels * 1.0 + rng.normal(size=labels.size)
    res = bootstrap_auc(labels, {"a": a, "b": b}, seed=0, baseline="a")["b"]
    assert res.diff_ci_low < 0 < res.diff_ci_high
    assert not res.significant
    assert res.p_value is not None and res.p_value > 0.05
    # the paired difference of independent models is wider than each model's own spread
    assert res.diff_ci_high - res.diff_ci_low > 0.5 * (res.ci_high - res.ci_low)


def test_bootstrap_argument_errors() -> None:
    labels = _test_set()
    scores = {"a": labels * 1.0}
    with pytest.raises(DataError, match="baseline 'z' is not among the models"):
        bootstrap_auc(labels, scores, baseline="z")
    with pytest.raises(DataError, match="scores of model 'a' has 3 entries"):
        bootstrap_auc(labels, {"a": [0.1, 0.2, 0.3]})
    with pytest.raises(DataError, match="ci must lie strictly between 0 and 1"):
        bootstrap_auc(labels, scores, ci=95)


def test_2000_by_550_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(6)
    labels = _test_set(6)
    models = {f"m{k}": labels * 0.5 + rng.normal(size=labels.size) for k in range(5)}
    bootstrap_auc(labels, models, n_replicates=50, baseline="m0")  # warm up
    start = time.perf_counter()
    bootstrap_auc(labels, {"m0": models["m0"]}, n_replicates=2000, seed=0)
    one = time.perf_counter() - start
    start = time.perf_counter()
    bootstrap_auc(labels, models, n_replicates=2000, seed=0, baseline="m0")
    five = time.perf_counter() - start
    print(f"2000 x 550 bootstrap: 1 model {one * 1e3:.0f} ms, 5 models paired {five * 1e3:.0f} ms")
    assert one < 0.5 and five < 2.0


# --------------------------------------------------------------------------- operating point


def test_operating_point_hand_worked() -> None:
    # neg: 0.1 0.2 0.35 0.6   pos: 0.3 0.5 0.7 0.9   (score >= threshold is positive)
    # threshold  TPR   FPR   (1-TPR)^2 + FPR^2
    #   0.9      1/4   0     0.5625
    #   0.7      2/4   0     0.25
    #   0.6      2/4   1/4   0.25 + 0.0625 = 0.3125
    #   0.5      3/4   1/4   0.0625 + 0.0625 = 0.125   <- minimum
    #   0.35     3/4   2/4   0.0625 + 0.25 = 0.3125
    #   0.3      1     2/4   0.25
    #   0.2      1     3/4   0.5625
    #   0.1      1     1     1
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.35, 0.6, 0.3, 0.5, 0.7, 0.9]
    assert operating_point(labels, scores) == 0.5
    assert sens_spec(labels, scores, 0.5) == (0.75, 0.75)


def test_operating_point_ties_go_to_the_higher_threshold() -> None:
    # neg: 0.1 0.3 0.6   pos: 0.4 0.7 0.8
    #   0.8: TPR 1/3 FPR 0   -> 4/9
    #   0.7: TPR 2/3 FPR 0   -> 1/9   <- tied minimum, higher threshold
    #   0.6: TPR 2/3 FPR 1/3 -> 2/9
    #   0.4: TPR 1   FPR 1/3 -> 1/9   <- tied minimum
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.3, 0.6, 0.4, 0.7, 0.8]
    assert operating_point(labels, scores) == 0.7


def test_operating_point_uses_collinear_roc_vertices() -> None:
    # ROC vertices (0,0) -> (0,.5) -> (.5,.5) -> (.5,1) -> (1,1) with thresholds in between:
    # every vertex is a corner here; the best (0.5 each way) ties, so the higher threshold wins.
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1]
    assert operating_point(labels, scores) == 0.9


def test_sens_spec_counts_score_equal_to_threshold_as_positive() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.2, 0.5, 0.4, 0.1, 0.0, 0.6])
    assert sens_spec(labels, scores, 0.5) == (0.75, 0.6)  # 3/4 pos called; 3/5 neg below
    assert sens_spec(labels, scores, 0.95) == (0.0, 1.0)
    assert sens_spec(labels, scores, -1.0) == (1.0, 0.0)
    with pytest.raises(DataError, match="threshold must be finite"):
        sens_spec(labels, scores, float("nan"))


@settings(max_examples=200, deadline=None)
@given(labelled_scores())
def test_operating_point_equals_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    from fractions import Fraction

    labels, scores = data
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    best = None
    for thr in sorted(set(scores.tolist()), reverse=True):  # highest first: wins ties
        called = scores >= thr
        tpr = Fraction(int((called & (labels == 1)).sum()), n_pos)
        fpr = Fraction(int((called & (labels == 0)).sum()), n_neg)
        dist = (1 - tpr) ** 2 + fpr**2
        if best is None or dist < best[0]:
            best = (dist, thr)
    assert best is not None
    assert operating_point(labels, scores) == best[1]


def test_auc_replicates_in_chunks_equal_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import boneaug.eval.metrics as metrics

    rng = np.random.default_rng(8)
    labels = _test_set(8, 20, 80)
    scores = np.round(rng.normal(size=labels.size) + labels, 1)
    idx = stratified_bootstrap_indices(labels, 37, seed=0)
    whole = auc_replicates(labels, scores, idx)
    monkeypatch.setattr(metrics, "_CHUNK_CELLS", 250)  # 2 replicates per chunk
    np.testing.assert_array_equal(auc_replicates(labels, scores, idx), whole)


def test_kernel_distance_is_zero_in_expectation_for_one_distribution_and_grows_with_a_shift(
) -> None:
    from boneaug.eval.metrics import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, sd = kernel_distance(a, b, subsets=20, subset_size=100)
    near, _ = kernel_distance(a, b + 0.2, subsets=20, subset_size=100)
    far, _ = kernel_distance(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 3 * sd / np.sqrt(20) + 1e-3  # unbiased: ~0 for one distribution
    assert 0 < near < far
    # the estimator itself, against the definition on one subset
    x, y = a[:5], b[:5] + 1.0
    k = lambda u, v: (u @ v / 16 + 1.0) ** 3  # noqa: E731
    want = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
            - 2 * sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25)
    assert kernel_distance(x, y, subsets=1, subset_size=5)[0] == pytest.approx(want)
    with pytest.raises(DataError, match="same D"):
        kernel_distance(a, b[:, :3])
