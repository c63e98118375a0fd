"""Evaluation statistics as pure numpy functions (paper section 4.4, SPEC 7).

- `roc_auc`, `roc_curve`: the ROC AUC (Mann-Whitney U with mid-ranks for ties) and the ROC points,
  equal to scikit-learn's `roc_auc_score` / `roc_curve` (tested to 1e-12 and point for point).
- `stratified_bootstrap_indices`, `auc_replicates`, `bootstrap_auc`: a stratified bootstrap
  (positives and negatives resampled separately, class counts kept, so every replicate has both
  classes), the AUC of every model on the SAME replicates, percentile CIs, and the paired AUC
  difference against a baseline with its CI and a two-sided bootstrap p-value.
- `operating_point`, `sens_spec`: the threshold minimising (1 - TPR)^2 + FPR^2 on validation, and
  sensitivity / specificity at a threshold (score >= threshold is called positive).

Conventions: labels are 1 = lesion (positive), 0 = no lesion; higher score = more lesion-like.
Nothing here reads or writes files, and randomness comes only from the seed or Generator passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from boneaug.errors import DataError

__all__ = [
    "AucResult",
    "auc_replicates",
    "bootstrap_auc",
    "kernel_distance",
    "operating_point",
    "roc_auc",
    "roc_counts",
    "roc_curve",
    "sens_spec",
    "stratified_bootstrap_indices",
]

# Replicates handled at once by `auc_replicates`: bounds memory to about this many int64 cells.
_CHUNK_CELLS = 4_000_000


# --------------------------------------------------------------------------- input checks


def _as_labels(labels: object, *, what: str = "labels") -> np.ndarray:
    """labels -> (N,) bool, True = positive. Accepts bool, integer or float arrays holding 0/1."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{what} must hold 0/1 (or bool), got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        found = np.unique(arr[bad])[:5]
        raise DataError(
            f"{what} must hold only 0 (no lesion) and 1 (lesion); found {found.tolist()} "
            f"at {int(bad.sum())} position(s), first at index {int(np.argmax(bad))}"
        )
    return arr == 1


def _as_scores(scores: object, n: int, *, what: str = "scores") -> np.ndarray:
    """scores -> (N,) float64, finite, same length as the labels."""
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] != n:
        raise DataError(
            f"{what} has {arr.shape[0]} entries but labels have {n}: score and label arrays "
            "must describe the same images in the same order"
        )
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{what} must be finite; {bad.size} entr{'y is' if bad.size == 1 else 'ies are'} "
            f"NaN or infinite (first at index {int(bad[0])}: {arr[bad[0]]}); "
            "check the model's output for that image"
        )
    return arr


def _check_binary(
    labels: object, scores: object, *, what: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels)
    s = _as_scores(scores, y.shape[0], what=what)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"ROC analysis needs both classes, got {n_pos} positive(s) and {n_neg} negative(s) "
            f"among {y.size} labels"
        )
    return y, s


# --------------------------------------------------------------------------- AUC and ROC


def roc_auc(labels: object, scores: object) -> float:
    """ROC AUC = P(score of a random positive > that of a random negative) + 0.5 P(tie).

    Computed as the Mann-Whitney U statistic from mid-ranks (ties share their average rank):
    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with R_pos the positives' rank sum.
    Rank sums are half-integers and exact in float64, so the only rounding is the final division.
    """
    y, s = _check_binary(labels, scores)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # (U,) 1-based rank of the last member of each tie group
    midranks = (ends - counts + 1 + ends) / 2.0  # (U,)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    rank_sum = float(midranks[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tps, fps, thresholds) at every distinct score, thresholds decreasing (sklearn's
    `_binary_clf_curve`): tps[k]/fps[k] count positives/negatives with score >= thresholds[k]."""
    order = np.argsort(s, kind="mergesort")[::-1]  # descending score
    s_sorted = s[order]
    # last position of every distinct score value (in descending order)
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y[order], dtype=np.int64)[last]  # (K,)
    fps = (last + 1) - tps  # (K,)
    return tps, fps, s_sorted[last]


def roc_curve(
    labels: object, scores: object, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), the same points as `sklearn.metrics.roc_curve`.

    thresholds are decreasing; point k counts `score >= thresholds[k]` as positive. The first
    point is (0, 0) with threshold +inf. With `drop_intermediate`, points that lie on a straight
    segment between their neighbours (invisible in a plot) are dropped, as sklearn does.
    """
    y, s = _check_binary(labels, scores)
    tps, fps, thresholds = roc_counts(y, s)
    if drop_intermediate and tps.size > 2:
        keep = np.flatnonzero(
            np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        )
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


# --------------------------------------------------------------------------- bootstrap


def stratified_bootstrap_indices(
    labels: object, n_replicates: int, *, seed: int | np.random.Generator
) -> np.ndarray:
    """(R, N) int64 indices of R stratified bootstrap replicates of N labelled samples.

    Positives and negatives are resampled separately, with replacement, each to its own count.
    Column j of every replicate is drawn from the class of sample j, so ``labels[idx[r]]`` equals
    ``labels`` for every replicate r: every replicate has both classes in the original numbers,
    and its AUC is always defined. `seed` is an int (``np.random.default_rng(seed)``) or a
    Generator; the same seed gives the same indices.
    """
    y = _as_labels(labels)
    if int(n_replicates) != n_replicates or n_replicates < 1:
        raise DataError(f"n_replicates must be a positive integer, got {n_replicates!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pos = np.flatnonzero(y)
    neg = np.flatnonzero(~y)
    out = np.empty((int(n_replicates), y.size), dtype=np.int64)  # (R, N)
    if pos.size:
        out[:, pos] = pos[rng.integers(0, pos.size, size=(int(n_replicates), pos.size))]
    if neg.size:
        out[:, neg] = neg[rng.integers(0, neg.size, size=(int(n_replicates), neg.size))]
    return out


def auc_replicates(labels: object, scores: object, indices: np.ndarray) -> np.ndarray:
    """(R,) ROC AUC of `scores` on each bootstrap replicate given by `indices` (R, N').

    Vectorised and exact: the scores are mapped once to their tie-group rank ("level"); per
    replicate, the counts of drawn positives and negatives per level give the Mann-Whitney count
    sum_pos (2 * #neg below + #neg tied) = 2 U, in integers. Replicate r's value is bit-identical to
    ``roc_auc(labels[indices[r]], scores[indices[r]])``. Cost O(R (N' + U)); replicates are handled
    in chunks so memory stays bounded.
    """
    y, s = _check_binary(labels, scores)
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"indices must be a 2-D integer array (R, N), got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise DataError(
            f"indices must lie in [0, {y.size}) for {y.size} samples; got values in "
            f"[{idx.min()}, {idx.max()}]: were the indices drawn for another set?"
        )
    _, level = np.unique(s, return_inverse=True)  # (N,) tie-group rank of each sample
    n_levels = int(level.max()) + 1
    n_rep, n_draw = idx.shape
    out = np.empty(n_rep, dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // max(n_draw, n_levels, 1))
    for start in range(0, n_rep, chunk):
        block = idx[start : start + chunk]  # (B, N')
        b = block.shape[0]
        is_pos = y[block]  # (B, N')
        n_pos = is_pos.sum(axis=1)  # (B,)
        n_neg = n_draw - n_pos
        if (n_pos == 0).any() or (n_neg == 0).any():
            bad = int(np.flatnonzero((n_pos == 0) | (n_neg == 0))[0]) + start
            raise DataError(
                f"bootstrap replicate {bad} holds only one class; draw indices with "
                "stratified_bootstrap_indices so every replicate keeps both classes"
            )
        cell = level[block] + (np.arange(b, dtype=np.int64) * n_levels)[:, None]  # (B, N')
        w_pos = np.bincount(cell[is_pos], minlength=b * n_levels).reshape(b, n_levels)  # (B, U)
        w_neg = np.bincount(cell[~is_pos], minlength=b * n_levels).reshape(b, n_levels)  # (B, U)
        neg_below = np.cumsum(w_neg, axis=1) - w_neg  # (B, U) negatives strictly below each level
        two_u = (w_pos * (2 * neg_below + w_neg)).sum(axis=1)  # (B,) exact integers
        out[start : start + b] = two_u / (2.0 * n_pos * n_neg)
    return out


@dataclass(frozen=True)
class AucResult:
    """ROC AUC of one model on the test set, with bootstrap statistics.

    auc is the point estimate on the full set; ci_low/ci_high the percentile bootstrap CI.
    With a baseline: diff = auc - baseline auc (point estimate), diff_ci_* the percentile CI of the
    per-replicate paired differences, significant = that CI excludes 0, p_value the two-sided
    bootstrap p (see `bootstrap_auc`). The diff fields are None for the baseline itself and when
    no baseline was given; p_value is None for numbers transcribed from a paper.
    """

    auc: float
    ci_low: float
    ci_high: float
    ci: float = 0.95
    n_replicates: int | None = None
    baseline: str | None = None
    diff: float | None = None
    diff_ci_low: float | None = None
    diff_ci_high: float | None = None
    significant: bool = False
    p_value: float | None = None


def _percentile_ci(values: np.ndarray, ci: float) -> tuple[float, float]:
    alpha = 1.0 - ci
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_auc(
    labels: object,
    scores_by_model: Mapping[str, object],
    *,
    n_replicates: int = 2000,
    seed: int | np.random.Generator = 0,
    ci: float = 0.95,
    baseline: str | None = None,
) -> dict[str, AucResult]:
    """AUC with a stratified-bootstrap percentile CI for every model, all on the SAME replicates.

    Paired comparison (paper 4.4): for every replicate r, d_r = AUC_model(r) - AUC_baseline(r)
    on the same resampled images. The model differs significantly from the baseline when the
    central `ci` percentile interval of d excludes 0. The two-sided bootstrap p-value is
    p = min(1, 2 min(P(d <= 0), P(d >= 0))) with P the share of replicates; it is the smallest
    level at which a percentile interval of d would just exclude 0, so p < 1 - ci goes with
    `significant` (up to quantile interpolation at the edges). p = 0 means "below 1/R": no
    replicate crossed 0, report it as p < 1/n_replicates.
    """
    if not scores_by_model:
        raise DataError("scores_by_model is empty: pass at least one model's scores")
    if not 0.0 < ci < 1.0:
        raise DataError(f"ci must lie strictly between 0 and 1, got {ci}")
    if baseline is not None and baseline not in scores_by_model:
        raise DataError(
            f"baseline {baseline!r} is not among the models {sorted(scores_by_model)}"
        )
    y = _as_labels(labels)
    checked = {name: _check_binary(y, sc, what=f"scores of model {name!r}")[1]
               for name, sc in scores_by_model.items()}
    idx = stratified_bootstrap_indices(y, n_replicates, seed=seed)  # (R, N) shared by all models
    reps = {name: auc_replicates(y, sc, idx) for name, sc in checked.items()}  # name -> (R,)
    points = {name: roc_auc(y, sc) for name, sc in checked.items()}
    results: dict[str, AucResult] = {}
    for name in checked:
        low, high = _percentile_ci(reps[name], ci)
        common = dict(auc=points[name], ci_low=low, ci_high=high, ci=ci,
                      n_replicates=int(n_replicates), baseline=baseline)
        if baseline is None or name == baseline:
            results[name] = AucResult(**common)
            continue
        d = reps[name] - reps[baseline]  # (R,) paired differences
        d_low, d_high = _percentile_ci(d, ci)
        p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        results[name] = AucResult(
            **common,
            diff=points[name] - points[baseline],
            diff_ci_low=d_low,
            diff_ci_high=d_high,
            significant=bool(d_low > 0 or d_high < 0),
            p_value=p,
        )
    return results


# --------------------------------------------------------------------------- operating point


def operating_point(labels_val: object, scores_val: object) -> float:
    """The threshold minimising (1 - TPR)^2 + FPR^2 over the validation ROC (paper 4.4).

    Candidates are the distinct validation scores (every ROC vertex, including the collinear ones
    a plot drops, but not the trivial +inf point). A score >= the threshold is called positive.
    The criterion is compared exactly, in integers: (P - TP)^2 N^2 + FP^2 P^2 (P, N the class
    counts), so true ties are not broken by rounding; they go to the highest threshold (the more
    specific operating point).
    """
    y, s = _check_binary(labels_val, scores_val)
    tps, fps, thresholds = roc_counts(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    # int64 holds the criterion while 2 (P N)^2 < 2^63; beyond, exact Python integers
    dtype = np.int64 if n_pos * n_neg < 2_000_000_000 else object
    miss = (n_pos - tps).astype(dtype)
    false = fps.astype(dtype)
    dist = miss * miss * (n_neg * n_neg) + false * false * (n_pos * n_pos)  # (K,)
    return float(thresholds[int(np.argmin(dist))])  # argmin: first = highest threshold on ties


def sens_spec(labels: object, scores: object, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) when score >= threshold is called positive."""
    y, s = _check_binary(labels, scores)
    if not np.isfinite(threshold):
        raise DataError(f"threshold must be finite, got {threshold}")
    called = s >= threshold
    return float(called[y].mean()), float((~called[~y]).mean())


# --------------------------------------------------------------------------- generated images


def kernel_distance(a: object, b: object, *, subsets: int = 50, subset_size: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel (Inception) Distance between two feature sets (Binkowski et al. 2018, "KID"):
    the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
    `subsets` random subsets of min(`subset_size`, n) rows of each; returns (mean, sd).

    KID, not FID: unbiased with a few hundred samples, which is all a translation set holds.
    Any feature space works (the name's Inception network is only the usual one; boneaug uses
    features that exist on real data, such as a pre-trained DRN's pooled features).
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise DataError(f"kernel_distance needs two (N, D) feature sets with N >= 2 and the same "
                        f"D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        values[k] = _mmd2_poly(xs, ys)
    return float(values.mean()), float(values.std())


def _mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples (m, D) under (x.y / D + 1)^3."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.mean())
