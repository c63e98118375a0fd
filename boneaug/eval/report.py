"""Result tables in the paper's layout (Tables 2 and 3), ROC figures, and the run report.

A run's report is rebuilt from stored predictions alone, so it can be re-rendered at any time
(`boneaug report RUN_URI` calls `render_report_from_predictions`). The layout, under any run URI
(s3://..., file://..., a path):

    <run_uri>/predictions/index.json           which models there are, and what they are
    <run_uri>/predictions/<model_key>.parquet  one row per scored image:
        image_id string | split string ("val" | "test") | label int8 (1 = lesion) | score float64
    <run_uri>/predictions/conspicuity.parquet  optional (synthetic cohorts): image_id string |
        conspicuity float32 (0 subtle .. 1 obvious; null for negatives)  (`write_conspicuity`)
    <run_uri>/report/report.md                 the tables, paired differences, paper comparison
    <run_uri>/report/metrics.json              the same numbers as data: every (body part, seed)
                                               table (`to_json` / `from_json`) and the aggregates
    <run_uri>/report/roc_<body part>.png       test-set ROC curves of the lowest seed's models
    <run_uri>/report/learning_curve_<body part>.png   test AUC against real positives
    <run_uri>/report/_MANIFEST.json            written last: the report is complete

index.json:

    {"schema": "boneaug.predictions/1",
     "models": {"<model_key>": {"type": "Baseline" | "Augmented" | "Copy-paste" | "Oracle" | "TL_G"
                                        | "TL_G + TL_PL" | ...,
                                "t": 0.9 | null, "augmented_samples": 1412,
                                "model_name": "boneaug-drn-humerus-aug", "model_version": "3",
                                "body_part": "humerus", "baseline": false,
                                "seed": 0, "positives": 120 | null, "learning_curve": false,
                                "train_losses": [0.78, ...], "val_aucs": [0.67, ...],
                                "kept_epoch": 11 | null}, ...}}

seed (default 0) is the classifier's training seed; positives (default null) the number of real
training positives the model saw; learning_curve (default false) marks a model of the learning
curve (the baseline trained on fewer or more real positives), shown in the learning-curve table and
figure, not in the main table. train_losses and val_aucs (default empty) are the classifier's
per-epoch history and kept_epoch (0-based) the epoch whose weights were scored: the report shows
how each seed's baseline moved from epoch 1 to it, and how alike the seeds' baselines rank the
test images (Spearman). Files without these fields load as seed 0, no learning curve, no history.

model_key is a file-name-safe id ([A-Za-z0-9._-], e.g. "aug-t0.90-s1"). Exactly one model per
(body part, seed) has "baseline": true (with "positives" set it is the 100 % point of the learning
curve); every model of a seed is paired against that seed's baseline. Every model of a body part,
whatever its seed, must be scored on the same test images (matched by image_id); the bootstrap
replicates are shared. One table is made per (body part, seed), named <body part> when the part has
one seed, else <body part>-s<seed>. The report aggregates them per body part: mean ± sd over
seeds, the paired ΔAUC per seed, the validation-chosen t of every type, the learning curve and the
AUC by conspicuity band. Producers write this layout with
`write_predictions`, or `import_predictions` from a classifier run's predictions.parquet (one
writer at a time: each call rewrites index.json), and `write_conspicuity`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from boneaug import storage
from boneaug.config import BODY_PARTS, EvalConfig
from boneaug.errors import DataError
from boneaug.eval.metrics import (
    AucResult,
    bootstrap_auc,
    operating_point,
    roc_auc,
    roc_curve,
    sens_spec,
)

__all__ = [
    "BANDS",
    "ArmSummary",
    "BandInput",
    "BandRow",
    "BandTable",
    "ChosenSummary",
    "ChosenT",
    "CurvePoint",
    "ModelMeta",
    "PartReport",
    "ReportRow",
    "RocCurve",
    "SeedStats",
    "Table",
    "band_aucs",
    "band_masks",
    "choose_t",
    "conspicuity_bands",
    "evaluate_models",
    "from_json",
    "import_predictions",
    "learning_curve",
    "paper_tables",
    "part_markdown",
    "plot_learning_curve",
    "plot_roc",
    "read_conspicuity",
    "read_index",
    "read_predictions",
    "render_report_from_predictions",
    "report_uri",
    "roc_curves",
    "summarize_arms",
    "summarize_part",
    "to_json",
    "to_markdown",
    "write_conspicuity",
    "write_part_reports",
    "write_predictions",
    "write_report",
]

PREDICTIONS_DIR = "predictions"
INDEX_NAME = "index.json"
REPORT_DIR = "report"
PREDICTIONS_SCHEMA = "boneaug.predictions/1"
TABLE_SCHEMA = "boneaug.table/1"
METRICS_SCHEMA = "boneaug.report/2"
CONSPICUITY_NAME = "conspicuity.parquet"
SPLITS = ("val", "test")
# conspicuity bands of the test positives: [lo, hi), the last one closed [lo, hi]
BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.0))
MIN_BAND_POSITIVES = 3  # a band with fewer test positives gets no AUC ("–")
MIN_GAIN = 0.03  # the ΔAUC a validation-chosen t must reach, CI above 0, to count as a gain
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# (val_labels, val_scores, test_labels, test_scores), each (N,) for its split
Predictions = tuple[Any, Any, Any, Any]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ModelMeta:
    """What a scored model is: its row in a table (paper Tables 2, 3) and where it came from."""

    type: str
    t: float | None = None
    augmented_samples: int | None = 0
    model_name: str | None = None
    model_version: str | None = None
    body_part: str | None = None
    baseline: bool = False
    seed: int = 0
    positives: int | None = None
    learning_curve: bool = False
    train_losses: tuple[float, ...] = ()  # per training epoch (empty: not recorded)
    val_aucs: tuple[float, ...] = ()
    kept_epoch: int | None = None  # 0-based epoch of the weights kept and scored


@dataclass(frozen=True)
class ReportRow:
    """One row of a results table. sens/spec are on the test set at `op`, chosen on validation."""

    key: str
    type: str
    t: float | None
    augmented_samples: int | None
    model_name: str | None
    model_version: str | None
    auc: AucResult
    sens: float | None
    spec: float | None
    op: float | None
    val_auc: float | None = None  # validation AUC: what chooses t
    positives: int | None = None  # real training positives the model saw
    learning_curve: bool = False  # a learning-curve model: not a row of the main table


@dataclass(frozen=True)
class Table:
    """A results table for one body part and training seed. `name` is file-name safe.

    `seed` is the bootstrap seed (EvalConfig.seed); `train_seed` the classifiers' training seed.
    """

    name: str
    title: str
    body_part: str
    rows: tuple[ReportRow, ...]
    baseline: str | None = None
    n_test_pos: int | None = None
    n_test_neg: int | None = None
    seed: int | None = None
    source: str = "boneaug"
    notes: tuple[str, ...] = field(default_factory=tuple)
    train_seed: int | None = None

    def row(self, key: str) -> ReportRow:
        for row in self.rows:
            if row.key == key:
                return row
        keys = [r.key for r in self.rows]
        raise KeyError(f"table {self.name!r} has no row {key!r}; rows: {keys}")


class RocCurve(NamedTuple):
    fpr: np.ndarray  # (K,)
    tpr: np.ndarray  # (K,)
    auc: float


@dataclass(frozen=True)
class SeedStats:
    """Mean and sample standard deviation (n - 1) of one number over training seeds."""

    mean: float
    sd: float | None  # None with a single seed
    n: int


@dataclass(frozen=True)
class ArmSummary:
    """One row of the main table, (type, t), across the training seeds that trained it.

    Per-seed tuples are aligned with `seeds`. diffs are the paired ΔAUC against each seed's own
    baseline (empty for the baseline); n_up / n_down count seeds whose CI of that difference lies
    above / below 0.
    """

    type: str
    t: float | None
    baseline: bool
    seeds: tuple[int, ...]
    keys: tuple[str, ...]
    aucs: tuple[float, ...]
    auc: SeedStats
    diffs: tuple[float, ...]
    diff: SeedStats | None
    n_up: int
    n_down: int
    samples: tuple[int | None, ...]
    samples_mean: float | None


@dataclass(frozen=True)
class ChosenT:
    """A type's model with the highest validation AUC in one seed (ties: the lower t)."""

    seed: int
    key: str
    t: float | None
    val_auc: float
    auc: AucResult  # test AUC and the paired difference against the seed's baseline


@dataclass(frozen=True)
class ChosenSummary:
    """A type at its validation-chosen t, over seeds: n_up seeds have the CI of ΔAUC above 0,
    n_gain of them also ΔAUC >= min_gain."""

    type: str
    picks: tuple[ChosenT, ...]
    auc: SeedStats
    diff: SeedStats
    n_up: int
    n_gain: int
    min_gain: float


@dataclass(frozen=True)
class CurvePoint:
    """One point of the learning curve: the models trained on `positives` real positives.

    share = positives / the seed's baseline positives (mean over seeds; None when unknown).
    """

    positives: int
    share: float | None
    seeds: tuple[int, ...]
    keys: tuple[str, ...]
    aucs: tuple[float, ...]
    auc: SeedStats


@dataclass(frozen=True)
class BandRow:
    """Test AUC by conspicuity band of one type (the baseline, or a type at its chosen t).

    aucs[i][b]: seed seeds[i], band b (None: too few positives); mean[b] over seeds; the last
    entry of each is "all test positives"."""

    type: str
    seeds: tuple[int, ...]
    keys: tuple[str, ...]
    ts: tuple[float | None, ...]
    aucs: tuple[tuple[float | None, ...], ...]
    mean: tuple[float | None, ...]


@dataclass(frozen=True)
class BandTable:
    """AUC of each band's test positives against all test negatives. n_pos per band, then all
    positives; n_unbanded: test positives without a conspicuity (in no band)."""

    bands: tuple[tuple[float, float], ...]
    n_pos: tuple[int, ...]
    n_neg: int
    n_unbanded: int
    rows: tuple[BandRow, ...]


class BandInput(NamedTuple):
    labels: np.ndarray  # (N,) test labels, 1 = lesion
    conspicuity: np.ndarray  # (N,) float64, NaN where unknown (negatives)
    scores: Mapping[str, np.ndarray]  # model key -> (N,) test scores, same images


@dataclass(frozen=True)
class SeedTraining:
    """How one baseline's fine-tuning went, from epoch 1 to the epoch whose weights it kept."""

    seed: int
    epochs: int
    kept_epoch: int  # 1-based
    first_loss: float
    kept_loss: float
    first_val_auc: float
    kept_val_auc: float

    @property
    def loss_fall(self) -> float:
        """Fraction by which the train loss fell from epoch 1 to the kept epoch."""
        return 1.0 - self.kept_loss / self.first_loss

    @property
    def val_rise(self) -> float:
        return self.kept_val_auc - self.first_val_auc


class SeedAgreement(NamedTuple):
    seed_a: int
    seed_b: int
    spearman: float  # rank correlation of the two baselines' test scores


@dataclass(frozen=True)
class TrainingHealth:
    """Does the baseline learn, and does it learn the same thing whatever the training seed?"""

    seeds: tuple[SeedTraining, ...]
    agreement: tuple[SeedAgreement, ...]


@dataclass(frozen=True)
class PartReport:
    """A body part's report: one table per training seed (ascending) and the aggregates."""

    body_part: str
    tables: tuple[Table, ...]
    arms: tuple[ArmSummary, ...]
    chosen: tuple[ChosenSummary, ...]
    curve: tuple[CurvePoint, ...]
    bands: BandTable | None = None
    training: TrainingHealth | None = None

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(_seed_of(t) for t in self.tables)


# --------------------------------------------------------------------------- evaluation


def _labels01(values: Any, where: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64) if arr.dtype == bool else arr


def _paired_test_labels(predictions: Mapping[str, Predictions], baseline: str) -> np.ndarray:
    """The baseline's test labels, after checking every model was scored on the same ones."""
    if baseline not in predictions:
        raise DataError(f"baseline {baseline!r} is not among the models {sorted(predictions)}")
    test_labels = _labels01(predictions[baseline][2], f"model {baseline!r} test")
    for key, pred in predictions.items():
        if len(pred) != 4:
            raise DataError(
                f"predictions[{key!r}] must be (val_labels, val_scores, test_labels, test_scores), "
                f"got {len(pred)} items"
            )
        other = _labels01(pred[2], f"model {key!r} test")
        if other.shape != test_labels.shape or not np.array_equal(other, test_labels):
            raise DataError(
                f"model {key!r} was scored on other test labels than the baseline {baseline!r} "
                f"({other.shape[0]} vs {test_labels.shape[0]} images, or a different order): the "
                "paired bootstrap needs every model scored on the same test images in the same "
                "order"
            )
    return test_labels


def _train_seed(keys: Sequence[str], baseline: str, meta: Mapping[str, ModelMeta]) -> int | None:
    """The training seed the models share (from `meta`); None without meta for the baseline."""
    if baseline not in meta:
        return None
    seed = meta[baseline].seed
    other = [k for k in keys if k in meta and meta[k].seed != seed]
    if other:
        raise DataError(
            f"models {other} have another training seed than the baseline {baseline!r} (seed "
            f"{seed}): a table pairs the models of one training seed with that seed's baseline"
        )
    return seed


def _report_row(key: str, pred: Predictions, auc: AucResult, info: ModelMeta) -> ReportRow:
    val_labels, val_scores, test_labels, test_scores = pred
    op = operating_point(val_labels, val_scores)
    sens, spec = sens_spec(test_labels, test_scores, op)
    return ReportRow(
        key=key, type=info.type, t=info.t, augmented_samples=info.augmented_samples,
        model_name=info.model_name, model_version=info.model_version,
        auc=auc, sens=sens, spec=spec, op=op, val_auc=roc_auc(val_labels, val_scores),
        positives=info.positives, learning_curve=info.learning_curve,
    )


def evaluate_models(
    predictions: Mapping[str, Predictions],
    *,
    baseline: str,
    config: EvalConfig,
    meta: Mapping[str, ModelMeta] | None = None,
    name: str | None = None,
    title: str | None = None,
    body_part: str | None = None,
) -> Table:
    """One table (one training seed): every model's test AUC with a bootstrap CI on shared
    replicates, the paired difference against `baseline`, the validation AUC, and
    sensitivity/specificity on test at the validation OP.

    predictions[key] = (val_labels, val_scores, test_labels, test_scores). All models must share
    the same test labels in the same order (the same images): the bootstrap is paired. With `meta`,
    every model must have the baseline's training seed (`Table.train_seed`).
    Rows: the baseline first, then the others in the mapping's order.
    """
    meta = meta or {}
    test_labels = _paired_test_labels(predictions, baseline)
    train_seed = _train_seed(list(predictions), baseline, meta)
    results = bootstrap_auc(
        test_labels,
        {key: pred[3] for key, pred in predictions.items()},
        n_replicates=config.n_bootstrap,
        seed=config.seed,
        ci=config.ci,
        baseline=baseline,
    )
    order = [baseline] + [k for k in predictions if k != baseline]
    rows = tuple(
        _report_row(key, predictions[key], results[key],
                    meta.get(key, ModelMeta(type="Baseline" if key == baseline else key)))
        for key in order
    )
    n_pos = int((test_labels == 1).sum())
    part = body_part or meta.get(baseline, ModelMeta(type="")).body_part or "unknown"
    return Table(
        name=name or part,
        title=title or f"{part}: lesion classification on the test set",
        body_part=part,
        rows=rows,
        baseline=baseline,
        n_test_pos=n_pos,
        n_test_neg=int(test_labels.size - n_pos),
        seed=config.seed,
        train_seed=train_seed,
    )


def roc_curves(predictions: Mapping[str, Predictions]) -> dict[str, RocCurve]:
    """Test-set ROC curve and AUC of every model, keyed like `predictions`."""
    out = {}
    for key, (_, _, labels, scores) in predictions.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        out[key] = RocCurve(fpr, tpr, roc_auc(labels, scores))
    return out


# --------------------------------------------------------------------------- aggregation over seeds

ArmId = tuple[str, float | None]  # (type, t rounded); the baseline is _BASELINE_ARM
_BASELINE_ARM: ArmId = ("", None)


def _seed_of(table: Table) -> int:
    return 0 if table.train_seed is None else table.train_seed


def _sorted_tables(tables: Sequence[Table]) -> list[Table]:
    """The tables by ascending training seed; one table per seed."""
    seeds = [_seed_of(t) for t in tables]
    if not tables or len(set(seeds)) != len(seeds):
        raise DataError(f"expected one table per training seed, got training seeds {seeds}")
    return sorted(tables, key=_seed_of)


def _stats(values: Sequence[float]) -> SeedStats:
    arr = np.asarray(values, dtype=np.float64)  # (S,)
    if arr.size == 0:
        raise DataError("no values to summarise over seeds")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else None
    return SeedStats(mean=float(arr.mean()), sd=sd, n=int(arr.size))


def _t_order(t: float | None) -> float:
    return -math.inf if t is None else float(t)


def _arm_id(row: ReportRow, table: Table) -> ArmId:
    if row.key == table.baseline:
        return _BASELINE_ARM
    return row.type, None if row.t is None else round(float(row.t), 6)


def _up(a: AucResult) -> bool:
    return a.significant and a.diff_ci_low is not None and a.diff_ci_low > 0


def _down(a: AucResult) -> bool:
    return a.significant and a.diff_ci_high is not None and a.diff_ci_high < 0


def _arm_summary(baseline: bool, hits: Sequence[tuple[int, ReportRow]]) -> ArmSummary:
    rows = [row for _, row in hits]
    aucs = tuple(r.auc.auc for r in rows)
    diffs = tuple(r.auc.diff for r in rows if r.auc.diff is not None)
    samples = tuple(r.augmented_samples for r in rows)
    known = [n for n in samples if n is not None]
    return ArmSummary(
        type=rows[0].type, t=rows[0].t, baseline=baseline,
        seeds=tuple(seed for seed, _ in hits), keys=tuple(r.key for r in rows),
        aucs=aucs, auc=_stats(aucs), diffs=diffs, diff=_stats(diffs) if diffs else None,
        n_up=sum(_up(r.auc) for r in rows), n_down=sum(_down(r.auc) for r in rows),
        samples=samples, samples_mean=float(np.mean(known)) if known else None,
    )


def summarize_arms(tables: Sequence[Table]) -> tuple[ArmSummary, ...]:
    """Every (type, t) row of the main table across training seeds (learning-curve rows are left
    to `learning_curve`): the baseline first, then by type in order of first appearance, then t.
    Two models of one type and t in the same seed are a DataError."""
    found: dict[ArmId, list[tuple[int, ReportRow]]] = {}
    for table in _sorted_tables(tables):
        seed = _seed_of(table)
        for row in table.rows:
            if row.learning_curve:
                continue
            hits = found.setdefault(_arm_id(row, table), [])
            twin = next((r.key for s, r in hits if s == seed), None)
            if twin is not None:
                raise DataError(
                    f"{table.body_part}, training seed {seed}: models {twin!r} and {row.key!r} are "
                    f"both {row.type!r} at t = {_fmt_t(row.t)}; keep one model per type, t and seed"
                )
            hits.append((seed, row))
    rank = {arm[0]: i for i, arm in reversed(list(enumerate(found)))}
    order = sorted(found, key=lambda a: (a != _BASELINE_ARM, rank[a[0]], _t_order(a[1])))
    return tuple(_arm_summary(arm == _BASELINE_ARM, found[arm]) for arm in order)


def _pick(seed: int, rows: Sequence[ReportRow]) -> ChosenT:
    """The row with the highest validation AUC; ties go to the lower t."""
    missing = [r.key for r in rows if r.val_auc is None]
    if missing:
        raise DataError(f"models {missing} have no validation AUC: cannot choose their t")
    best = max(sorted(rows, key=lambda r: _t_order(r.t)), key=lambda r: float(r.val_auc or 0.0))
    return ChosenT(seed=seed, key=best.key, t=best.t, val_auc=float(best.val_auc or 0.0),
                   auc=best.auc)


def _chosen_summary(type_: str, picks: Sequence[ChosenT], min_gain: float) -> ChosenSummary:
    diffs = [p.auc.diff for p in picks if p.auc.diff is not None]
    if len(diffs) != len(picks):
        raise DataError(f"{type_}: models {[p.key for p in picks]} lack a paired difference "
                        "against their seed's baseline")
    ups = [p for p in picks if _up(p.auc)]
    return ChosenSummary(
        type=type_, picks=tuple(picks),
        auc=_stats([p.auc.auc for p in picks]), diff=_stats(diffs),
        n_up=len(ups), n_gain=sum((p.auc.diff or 0.0) >= min_gain for p in ups),
        min_gain=min_gain,
    )


def choose_t(tables: Sequence[Table], *, min_gain: float = MIN_GAIN) -> tuple[ChosenSummary, ...]:
    """For every non-baseline type and training seed, the t whose model has the highest
    validation AUC (learning-curve models excluded), with its paired ΔAUC against that seed's
    baseline; per type: mean ± sd of ΔAUC at the chosen t and how many seeds have the CI above 0
    (n_up), and ΔAUC >= min_gain too (n_gain). Types in order of first appearance."""
    picks: dict[str, list[ChosenT]] = {}
    for table in _sorted_tables(tables):
        candidates: dict[str, list[ReportRow]] = {}
        for row in table.rows:
            if row.key != table.baseline and not row.learning_curve:
                candidates.setdefault(row.type, []).append(row)
        for type_, rows in candidates.items():
            picks.setdefault(type_, []).append(_pick(_seed_of(table), rows))
    return tuple(_chosen_summary(type_, p, min_gain) for type_, p in picks.items())


def _curve_hits(tables: Sequence[Table]) -> dict[int, list[tuple[int, str, float, float | None]]]:
    """positives -> [(seed, key, test AUC, share of the seed's baseline positives)]."""
    points: dict[int, list[tuple[int, str, float, float | None]]] = {}
    for table in _sorted_tables(tables):
        seed, base = _seed_of(table), table.row(table.baseline or "")
        for row in table.rows:
            if not (row.learning_curve or row.key == base.key):
                continue
            if row.positives is None:
                if row.learning_curve:
                    raise DataError(f"learning-curve model {row.key!r} has no \"positives\": "
                                    "set the number of real training positives it saw")
                continue
            hits = points.setdefault(int(row.positives), [])
            twin = next((k for s, k, _, _ in hits if s == seed), None)
            if twin is not None:
                raise DataError(f"{table.body_part}, training seed {seed}: models {twin!r} and "
                                f"{row.key!r} both trained on {row.positives} real positives")
            share = row.positives / base.positives if base.positives else None
            hits.append((seed, row.key, row.auc.auc, share))
    return points


def learning_curve(tables: Sequence[Table]) -> tuple[CurvePoint, ...]:
    """Test AUC against real training positives: every seed's baseline (with `positives`) and
    learning-curve models, one point per number of positives, sorted by it."""
    out = []
    for positives, hits in sorted(_curve_hits(tables).items()):
        shares = [h[3] for h in hits if h[3] is not None]
        aucs = tuple(h[2] for h in hits)
        out.append(CurvePoint(
            positives=positives, share=float(np.mean(shares)) if shares else None,
            seeds=tuple(h[0] for h in hits), keys=tuple(h[1] for h in hits),
            aucs=aucs, auc=_stats(aucs),
        ))
    return tuple(out)


def _has_curve(tables: Sequence[Table], curve: Sequence[CurvePoint]) -> bool:
    return len(curve) > 1 or any(r.learning_curve for t in tables for r in t.rows)


def band_masks(
    labels: Any, conspicuity: Any, bands: Sequence[tuple[float, float]] = BANDS
) -> list[np.ndarray]:
    """(N,) bool per band: the positives whose conspicuity lies in [lo, hi) ([lo, hi] for the
    last band). NaN conspicuity is in no band."""
    y = np.asarray(labels) == 1  # (N,)
    c = np.asarray(conspicuity, dtype=np.float64)  # (N,)
    if c.shape != y.shape:
        raise DataError(f"conspicuity {c.shape} and labels {y.shape} must align")
    out = []
    for i, (lo, hi) in enumerate(bands):
        upper = c <= hi if i == len(bands) - 1 else c < hi
        out.append(y & (c >= lo) & upper)
    return out


def band_aucs(
    labels: Any, scores: Any, masks: Sequence[np.ndarray], *,
    min_positives: int = MIN_BAND_POSITIVES,
) -> tuple[float | None, ...]:
    """Per mask: the AUC of the mask's positives against ALL negatives; None when the mask holds
    fewer than `min_positives` positives."""
    y = np.asarray(labels) == 1  # (N,)
    s = np.asarray(scores, dtype=np.float64)  # (N,)
    out: list[float | None] = []
    for mask in masks:
        pos = np.asarray(mask, dtype=bool) & y
        if int(pos.sum()) < min_positives:
            out.append(None)
            continue
        keep = pos | ~y
        out.append(roc_auc(y[keep], s[keep]))
    return tuple(out)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known and len(known) == len(values) else None


def conspicuity_bands(
    data: BandInput,
    lineup: Sequence[tuple[str, Sequence[tuple[int, str, float | None]]]],
    *,
    bands: Sequence[tuple[float, float]] = BANDS,
) -> BandTable:
    """Test AUC by conspicuity band for each (type, [(seed, model key, t)]) of `lineup`, then of
    all test positives; mean over seeds (None where a band has too few positives)."""
    y = np.asarray(data.labels) == 1
    masks = band_masks(y, data.conspicuity, bands) + [y]
    rows = []
    for type_, picks in lineup:
        aucs = tuple(band_aucs(y, data.scores[key], masks) for _, key, _ in picks)
        rows.append(BandRow(
            type=type_, seeds=tuple(p[0] for p in picks), keys=tuple(p[1] for p in picks),
            ts=tuple(p[2] for p in picks), aucs=aucs,
            mean=tuple(_mean_or_none([a[b] for a in aucs]) for b in range(len(masks))),
        ))
    return BandTable(
        bands=tuple(bands), n_pos=tuple(int(m.sum()) for m in masks), n_neg=int((~y).sum()),
        n_unbanded=int((y & ~np.isfinite(np.asarray(data.conspicuity, float))).sum()),
        rows=tuple(rows),
    )


def _band_lineup(
    arms: Sequence[ArmSummary], chosen: Sequence[ChosenSummary]
) -> list[tuple[str, list[tuple[int, str, float | None]]]]:
    base = next(a for a in arms if a.baseline)
    lineup = [(base.type, [(s, k, None) for s, k in zip(base.seeds, base.keys, strict=True)])]
    lineup += [(c.type, [(p.seed, p.key, p.t) for p in c.picks]) for c in chosen]
    return lineup


def _seed_training(seed: int, meta: ModelMeta) -> SeedTraining | None:
    losses, aucs = list(meta.train_losses), list(meta.val_aucs)
    if not losses or len(aucs) != len(losses):
        return None  # a model trained before the history was recorded
    kept = len(losses) - 1 if meta.kept_epoch is None else meta.kept_epoch
    return SeedTraining(seed=seed, epochs=len(losses), kept_epoch=kept + 1,
                        first_loss=losses[0], kept_loss=losses[kept],
                        first_val_auc=aucs[0], kept_val_auc=aucs[kept])


def training_health(baselines: Mapping[int, tuple[ModelMeta, np.ndarray]]) -> TrainingHealth:
    """Per training seed, how its baseline's train loss and val AUC moved from epoch 1 to the
    kept epoch; between every two seeds, the Spearman correlation of their baselines' test
    scores (`baselines`: seed -> (its meta, its (N,) test scores, images in the same order))."""
    from scipy.stats import spearmanr

    seeds = sorted(baselines)
    runs = (_seed_training(s, baselines[s][0]) for s in seeds)
    agreement = tuple(
        SeedAgreement(a, b, float(spearmanr(baselines[a][1], baselines[b][1]).statistic))
        for i, a in enumerate(seeds) for b in seeds[i + 1:])
    return TrainingHealth(seeds=tuple(r for r in runs if r is not None), agreement=agreement)


def summarize_part(
    tables: Sequence[Table], *, min_gain: float = MIN_GAIN, bands: BandInput | None = None,
    training: TrainingHealth | None = None,
) -> PartReport:
    """A body part's aggregates from its per-seed tables (and, with `bands`, its test scores and
    conspicuity): arms, validation-chosen t, learning curve, AUC by conspicuity band; `training`
    (the baselines' `training_health`) is carried as is."""
    ordered = tuple(_sorted_tables(tables))
    arms = summarize_arms(ordered)
    chosen = choose_t(ordered, min_gain=min_gain)
    curve = learning_curve(ordered)
    return PartReport(
        body_part=ordered[0].body_part, tables=ordered, arms=arms, chosen=chosen,
        curve=curve if _has_curve(ordered, curve) else (),
        bands=None if bands is None else conspicuity_bands(bands, _band_lineup(arms, chosen)),
        training=training,
    )


# --------------------------------------------------------------------------- markdown


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "–"
    if t == 0:
        return "0"
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def _fmt_int(n: int | None) -> str:
    return "–" if n is None else str(n)


def _cell(text: str | None) -> str:
    return "–" if not text else text.replace("|", "\\|")


def _ci_label(table: Table) -> str:
    ci = table.rows[0].auc.ci if table.rows else 0.95
    return f"CI {ci * 100:g} %"


def _best_keys(table: Table) -> set[str]:
    if not table.rows:
        return set()
    best = max(row.auc.auc for row in table.rows)
    return {row.key for row in table.rows if math.isclose(row.auc.auc, best, abs_tol=1e-12)}


def _auc_cell(row: ReportRow, bold: bool) -> str:
    text = f"{row.auc.auc:.3f} ({row.auc.ci_low:.3f}-{row.auc.ci_high:.3f})"
    if bold:
        text = f"**{text}**"
    return text + ("\\*" if row.auc.significant else "")


def _fmt_p(p: float | None, n_replicates: int | None) -> str:
    if p is None:
        return "–"
    if p == 0 and n_replicates:
        return f"< {1 / n_replicates:.2g}"
    return f"{p:.3f}"


def _diff_text(a: AucResult, *, star: bool = False) -> str:
    """'+0.041 (+0.012 to +0.070)', starred when `star` and the difference is significant."""
    text = f"{a.diff:+.3f} ({a.diff_ci_low:+.3f} to {a.diff_ci_high:+.3f})"
    return text + ("\\*" if star and a.significant else "")


def _fmt_stats(stats: SeedStats | None, *, signed: bool = False, n: bool = True) -> str:
    """'0.853 ± 0.012 (n = 2)'; '0.812 (n = 1)' with one seed."""
    if stats is None:
        return "–"
    mean = f"{stats.mean:+.3f}" if signed else f"{stats.mean:.3f}"
    text = mean if stats.sd is None else f"{mean} ± {stats.sd:.3f}"
    return f"{text} (n = {stats.n})" if n else text


def _row_key(row: ReportRow) -> tuple[str, float | None]:
    t = None if row.type.lower() == "baseline" or row.t is None else round(row.t, 4)
    return row.type.strip().lower(), t


def _match_paper(ours: Table, paper: Table) -> list[tuple[ReportRow | None, ReportRow | None]]:
    """Pairs (our row, paper row): same type, and the same t when both give one."""
    unused = list(paper.rows)
    pairs: list[tuple[ReportRow | None, ReportRow | None]] = []
    for row in ours.rows:
        kind, t = _row_key(row)
        hit = next((p for p in unused if _row_key(p) == (kind, t)), None)
        if hit is None:
            hit = next((p for p in unused if _row_key(p)[0] == kind and
                        (_row_key(p)[1] is None or t is None)), None)
        if hit is not None:
            unused.remove(hit)
        pairs.append((row, hit))
    pairs.extend((None, p) for p in unused)
    return pairs


def _paper_comparison(ours: Table, paper: Table) -> list[str]:
    lines = [
        f"Side by side with the paper ({paper.title}): each of our columns is followed by the "
        "paper's.",
        "",
        "| Type | t | Augmented samples | paper | ROC AUC (CI 95 %) | paper | Sens. | paper "
        "| Spec. | paper | OP | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours_best, paper_best = _best_keys(ours), _best_keys(paper)
    for mine, theirs in _match_paper(ours, paper):
        ref = mine or theirs
        assert ref is not None
        t = mine.t if mine is not None and mine.t is not None else (theirs.t if theirs else None)
        cells = [
            _cell(ref.type),
            _fmt_t(t),
            _fmt_int(mine.augmented_samples) if mine else "–",
            _fmt_int(theirs.augmented_samples) if theirs else "–",
            _auc_cell(mine, mine.key in ours_best) if mine else "–",
            _auc_cell(theirs, theirs.key in paper_best) if theirs else "–",
            _fmt(mine.sens) if mine else "–", _fmt(theirs.sens) if theirs else "–",
            _fmt(mine.spec) if mine else "–", _fmt(theirs.spec) if theirs else "–",
            _fmt(mine.op) if mine else "–", _fmt(theirs.op) if theirs else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"Paper note: {note}" for note in paper.notes)
    if paper.notes:
        lines.append("")
    return lines


def _main_view(table: Table) -> Table:
    """The table without its learning-curve rows (they belong to the learning curve)."""
    if not any(row.learning_curve for row in table.rows):
        return table
    return dataclasses.replace(table, rows=tuple(r for r in table.rows if not r.learning_curve))


def _main_table_lines(
    table: Table,
    *,
    samples: Mapping[str, str] | None = None,
    extra: tuple[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Type | t | Augmented samples | ROC AUC (CI) | Sens. | Spec. | OP [| extra column]."""
    best = _best_keys(table)
    header = f"| Type | t | Augmented samples | ROC AUC ({_ci_label(table)}) | Sens. | Spec. | OP |"
    rule = "|---|---|---|---|---|---|---|"
    if extra is not None:
        header, rule = f"{header} {extra[0]} |", f"{rule}---|"
    lines = [header, rule]
    for row in table.rows:
        cells = [
            _cell(row.type), _fmt_t(row.t),
            samples[row.key] if samples else _fmt_int(row.augmented_samples),
            _auc_cell(row, row.key in best), _fmt(row.sens), _fmt(row.spec), _fmt(row.op),
        ]
        if extra is not None:
            cells.append(extra[1][row.key])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _diff_lines(table: Table) -> list[str]:
    """One seed's paired differences against its baseline, with p and the model."""
    diffs = [row for row in table.rows if row.auc.diff is not None]
    if not diffs:
        return []
    base = table.row(table.baseline).type if table.baseline else "baseline"
    lines = [
        f"Paired AUC difference against the baseline ({base}), on the same bootstrap replicates:",
        "",
        f"| Type | t | ΔAUC ({_ci_label(table)}) | p (two-sided, bootstrap) | significant "
        "| model |",
        "|---|---|---|---|---|---|",
    ]
    for row in diffs:
        a = row.auc
        model = row.model_name or row.key
        if row.model_version:
            model = f"{model} v{row.model_version}"
        lines.append(
            f"| {_cell(row.type)} | {_fmt_t(row.t)} | {_diff_text(a)} | "
            f"{_fmt_p(a.p_value, a.n_replicates)} | {'yes' if a.significant else 'no'} | "
            f"{_cell(model)} |"
        )
    return lines + [""]


def _note_lines(table: Table) -> list[str]:
    prefix = "Paper note" if table.source == "paper" else "Note"
    lines = [f"{prefix}: {note}" for note in table.notes]
    return lines + [""] if lines else []


def to_markdown(table: Table, *, paper: Table | None = None) -> str:
    """The table in the paper's layout (Type | t | Augmented samples | ROC AUC (CI 95 %) | Sens. |
    Spec. | OP), then the paired differences against the baseline, then (with `paper=`) a
    side-by-side comparison with the paper's numbers. Learning-curve rows are left out.

    As in the paper: bold marks the highest AUC in the table, * a significant difference from the
    baseline (the CI of the paired bootstrap AUC difference excludes 0, in either direction).
    """
    table = _main_view(table)
    lines = [f"### {table.title}", "", *_main_table_lines(table), "", _legend(table), ""]
    lines += _diff_lines(table) + _note_lines(table)
    if paper is not None:
        lines.extend(_paper_comparison(table, paper))
    return "\n".join(lines).rstrip() + "\n"


def _legend(table: Table) -> str:
    if table.source == "paper":
        return ("Numbers transcribed from the paper. Bold: highest AUC in the table; "
                "*: significantly different from the baseline (paper 4.4).")
    first = table.rows[0].auc if table.rows else None
    n_rep = first.n_replicates if first else None
    counts = ""
    if table.n_test_pos is not None and table.n_test_neg is not None:
        counts = f"Test set {table.n_test_pos}:{table.n_test_neg} (lesion:non-lesion); "
    return (
        f"{counts}{n_rep} stratified bootstrap replicates (seed {table.seed}), the same for every "
        "model; percentile CIs. Bold: highest AUC in the table. *: the CI of the paired AUC "
        "difference against the baseline excludes 0. Sens./Spec.: test set at the operating point "
        "(OP) that minimises (1 - TPR)^2 + FPR^2 on validation (score >= OP is positive)."
    )


def _tables_by_seed(part: PartReport) -> dict[int, Table]:
    return {_seed_of(t): t for t in part.tables}


def _arm_view(part: PartReport) -> Table:
    """The main table across seeds: one row per arm, each the row of its lowest seed."""
    by_seed = _tables_by_seed(part)
    rows = tuple(by_seed[arm.seeds[0]].row(arm.keys[0]) for arm in part.arms)
    return dataclasses.replace(part.tables[0], rows=rows)


def _samples_cell(arm: ArmSummary) -> str:
    if len(set(arm.samples)) <= 1 or arm.samples_mean is None:
        return _fmt_int(arm.samples[0])
    return f"{arm.samples_mean:.0f} (mean)"


def _seed_count(up: int, down: int, n: int) -> str:
    """'2/3 up', '1/3 up, 1/3 down', '0/3'."""
    parts = [f"{up}/{n} up"] * bool(up) + [f"{down}/{n} down"] * bool(down)
    return ", ".join(parts) or f"0/{n}"


def _seeds_legend(part: PartReport) -> str:
    seeds = ", ".join(str(s) for s in part.seeds)
    return (
        f"Training seeds {seeds}: the columns up to OP show seed {part.seeds[0]} (a row absent "
        "there shows its lowest seed). AUC mean ± sd: test AUC over the seeds that trained the "
        "row (sample sd, n - 1); every model is paired against its own seed's baseline."
    )


def _multi_seed_lines(part: PartReport) -> list[str]:
    view = _arm_view(part)
    extra = {arm.keys[0]: _fmt_stats(arm.auc) for arm in part.arms}
    samples = {arm.keys[0]: _samples_cell(arm) for arm in part.arms}
    lines = [f"### {view.title}", ""]
    lines += _main_table_lines(view, samples=samples, extra=("AUC mean ± sd (n seeds)", extra))
    lines += ["", f"{_legend(view)} {_seeds_legend(part)}", ""]
    return lines + _multi_diff_lines(part) + _note_lines(view)


def _multi_diff_lines(part: PartReport) -> list[str]:
    """ΔAUC per (type, t): mean ± sd over seeds, each seed's ΔAUC (CI), significant seeds."""
    arms = [arm for arm in part.arms if not arm.baseline]
    if not arms:
        return []
    by_seed, ci_label = _tables_by_seed(part), _ci_label(part.tables[0])
    header = " | ".join(f"seed {s}: ΔAUC ({ci_label})" for s in part.seeds)
    lines = [
        "Paired AUC difference against each training seed's own baseline, on the same bootstrap "
        "replicates (*: the CI excludes 0):",
        "",
        f"| Type | t | ΔAUC mean ± sd | {header} | significant |",
        "|---|---|---|" + "---|" * len(part.seeds) + "---|",
    ]
    for arm in arms:
        keys = dict(zip(arm.seeds, arm.keys, strict=True))
        cells = [_diff_text(by_seed[s].row(keys[s]).auc, star=True) if s in keys else "–"
                 for s in part.seeds]
        lines.append(
            f"| {_cell(arm.type)} | {_fmt_t(arm.t)} | "
            f"{_fmt_stats(arm.diff, signed=True, n=False)} | {' | '.join(cells)} | "
            f"{_seed_count(arm.n_up, arm.n_down, len(arm.seeds))} |"
        )
    return lines + [""]


def _show_chosen(part: PartReport) -> bool:
    """Worth a table with several seeds, or when some type has several t in a seed."""
    if not part.chosen:
        return False
    if len(part.tables) > 1:
        return True
    arms = [a for a in part.arms if not a.baseline]
    return any(sum(a.type == b.type for b in arms) > 1 for a in arms)


def _pick_cell(pick: ChosenT) -> str:
    a = pick.auc
    p = _fmt_p(a.p_value, a.n_replicates)
    p = f"p {p}" if p.startswith("<") else f"p = {p}"
    return (f"t = {_fmt_t(pick.t)} (val {pick.val_auc:.3f}): {_diff_text(a, star=True)}, {p}")


def _chosen_lines(part: PartReport) -> list[str]:
    gain = part.chosen[0].min_gain
    seeds = part.seeds
    lines = [
        "Validation-chosen t: per type and training seed, the t whose model has the highest "
        "validation AUC (ties: the lower t), and its paired ΔAUC (CI) against that seed's "
        "baseline. CI > 0: seeds whose CI lies above 0.",
        "",
        "| Type | " + " | ".join(f"seed {s}" for s in seeds)
        + f" | ΔAUC mean ± sd | CI > 0 | CI > 0 and ΔAUC ≥ {gain:+.3f} |",
        "|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for c in part.chosen:
        picks = {p.seed: p for p in c.picks}
        cells = [_pick_cell(picks[s]) if s in picks else "–" for s in seeds]
        n = len(c.picks)
        lines.append(
            f"| {_cell(c.type)} | {' | '.join(cells)} | "
            f"{_fmt_stats(c.diff, signed=True, n=False)} | "
            f"{c.n_up}/{n} | {c.n_gain}/{n} |"
        )
    return lines + [""]


def _share(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.0f} %"


def _curve_lines(part: PartReport, png: str | None) -> list[str]:
    seeds = part.seeds
    lines = [
        "Learning curve: the baseline trained on a share of the real training positives (and, on "
        "a synthetic cohort, on more); test AUC per training seed.",
        "",
        "| Real positives | Share of the full set | Test AUC mean ± sd (n seeds) | "
        + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|" + "---|" * len(seeds),
    ]
    for point in part.curve:
        aucs = dict(zip(point.seeds, point.aucs, strict=True))
        cells = [_fmt(aucs.get(s)) for s in seeds]
        lines.append(f"| {point.positives} | {_share(point.share)} | {_fmt_stats(point.auc)} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    if png:
        lines += [f"![Learning curve, {part.body_part}]({png})", ""]
    return lines


def _training_lines(training: TrainingHealth) -> list[str]:
    """The baselines' fine-tuning: did the train loss fall and the val AUC rise from epoch 1 to
    the kept weights, and do two training seeds rank the test images alike?"""
    lines: list[str] = []
    if training.seeds:
        lines += [
            "Baseline fine-tuning, per training seed: the train loss and val AUC of epoch 1 and of "
            "the epoch whose weights were kept.",
            "",
            "| Seed | Epochs | Kept epoch | Train loss: epoch 1 -> kept (fall) | "
            "Val AUC: epoch 1 -> kept (rise) |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r.seed} | {r.epochs} | {r.kept_epoch} | {r.first_loss:.3f} -> "
                  f"{r.kept_loss:.3f} ({r.loss_fall * 100:.0f} %) | {r.first_val_auc:.3f} -> "
                  f"{r.kept_val_auc:.3f} ({r.val_rise:+.3f}) |" for r in training.seeds]
        lines.append("")
    if training.agreement:
        pairs = ", ".join(f"seeds {a.seed_a} and {a.seed_b}: {a.spearman:.2f}"
                          for a in training.agreement)
        lines += [f"Baselines' test scores, Spearman correlation between training seeds: {pairs}.",
                  ""]
    return lines


def _band_label(band: tuple[float, float], last: bool) -> str:
    lo, hi = band
    return f"[{lo:g}, {hi:.1f}]" if last else f"[{lo:g}, {hi:g})"


def _ts_cell(ts: Sequence[float | None]) -> str:
    labels = [_fmt_t(t) for t in ts]
    return labels[0] if len(set(labels)) == 1 else ", ".join(labels) + " (by seed)"


def _band_lines(bands: BandTable) -> list[str]:
    n = len(bands.bands)
    heads = [f"{_band_label(b, i == n - 1)} (n = {bands.n_pos[i]})"
             for i, b in enumerate(bands.bands)] + [f"all (n = {bands.n_pos[-1]})"]
    lines = [
        "Test AUC by conspicuity band: each band's test positives against all "
        f"{bands.n_neg} test negatives, mean over training seeds; – where a band has fewer than "
        f"{MIN_BAND_POSITIVES} positives. Each type at its validation-chosen t.",
        "",
        "| Type | t | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for row in bands.rows:
        lines.append(f"| {_cell(row.type)} | {_ts_cell(row.ts)} | "
                     + " | ".join(_fmt(m) for m in row.mean) + " |")
    lines.append("")
    if bands.n_unbanded:
        lines += [f"Note: {bands.n_unbanded} test positive(s) have no conspicuity and are in no "
                  "band (only in 'all').", ""]
    return lines


def part_markdown(
    part: PartReport, *, paper: Table | None = None, figures: Mapping[str, str] | None = None
) -> str:
    """A body part's section of report.md: the main table (with mean ± sd over seeds when there
    are several), the paired ΔAUC, the validation-chosen t, the learning curve, the AUC by
    conspicuity band, the paper comparison (lowest seed) and the figures
    (figures["roc"], figures["learning_curve"]: file names beside report.md)."""
    figures = figures or {}
    lowest = _main_view(part.tables[0])
    if len(part.tables) == 1:
        lines = [to_markdown(lowest).rstrip(), ""]
    else:
        lines = _multi_seed_lines(part)
    if _show_chosen(part):
        lines += _chosen_lines(part)
    if part.curve:
        lines += _curve_lines(part, figures.get("learning_curve"))
    if part.bands is not None:
        lines += _band_lines(part.bands)
    if part.training is not None:
        lines += _training_lines(part.training)
    if paper is not None:
        lines += _paper_comparison(lowest, paper)
    if figures.get("roc"):
        lines += [f"![ROC curves, {lowest.title}]({figures['roc']})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- JSON


def to_json(table: Table) -> dict[str, Any]:
    """The table as JSON-ready data (`from_json` reads it back to an equal Table)."""
    out = dataclasses.asdict(table)
    out["schema"] = TABLE_SCHEMA
    out["rows"] = [dataclasses.asdict(row) for row in table.rows]
    out["notes"] = list(table.notes)
    return out


def from_json(data: Mapping[str, Any]) -> Table:
    """A Table from `to_json`'s output."""
    if data.get("schema") != TABLE_SCHEMA:
        raise DataError(
            f"not a boneaug table: schema {data.get('schema')!r}, expected {TABLE_SCHEMA!r}"
        )
    fields = {f.name for f in dataclasses.fields(Table)}
    try:
        rows = tuple(
            ReportRow(**{**row, "auc": AucResult(**row["auc"])}) for row in data["rows"]
        )
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs.update(rows=rows, notes=tuple(data.get("notes", ())))
        return Table(**kwargs)
    except (KeyError, TypeError) as exc:
        raise DataError(f"malformed table JSON ({data.get('name')!r}): {exc}") from exc


# --------------------------------------------------------------------------- the paper's numbers


def _paper_row(key: str, type_: str, t: float | None, samples: int | None,
               numbers: tuple[float, float, float, float, float, float],
               significant: bool) -> ReportRow:
    """One transcribed row; numbers = (AUC, CI low, CI high, sensitivity, specificity, operating
    point), as the paper's columns give them."""
    auc, low, high, sens, spec, op = numbers
    result = AucResult(auc=auc, ci_low=low, ci_high=high, ci=0.95, baseline="baseline",
                       significant=significant)
    return ReportRow(key=key, type=type_, t=t, augmented_samples=samples, model_name=None,
                     model_version=None, auc=result, sens=sens, spec=spec, op=op)


def paper_tables() -> dict[str, Table]:
    """The paper's Table 2 (humerus) and Table 3 (a: tibia, b: femur), keyed by body part.

    Transcribed from paper/gupta2019-bone-lesion-augmentation.md. significant = the paper's '*'.
    Where the paper leaves a cell blank, the value is None (see each table's notes).
    """
    r = _paper_row
    aug, tlg, tlgpl = "Augmented", "TL_G", "TL_G + TL_PL"
    humerus = Table(
        name="paper_table2_humerus",
        title="Paper Table 2: humerus, ablation of t",
        body_part="humerus",
        rows=(
            r("baseline", "Baseline", 0.0, 0, (0.876, 0.817, 0.926, 0.9, 0.776, 0.455), False),
            r("augmented_t0.70", aug, 0.70, 1412, (0.882, 0.829, 0.928, 0.80, 0.842, 0.390), False),
            r("augmented_t0.85", aug, 0.85, None, (0.899, 0.854, 0.939, 0.82, 0.802, 0.086), False),
            r("augmented_t0.90", aug, 0.90, None, (0.924, 0.889, 0.955, 0.84, 0.798, 0.058), True),
            r("augmented_t0.95", aug, 0.95, None, (0.877, 0.820, 0.926, 0.90, 0.766, 0.273), False),
        ),
        baseline="baseline", n_test_pos=50, n_test_neg=500, source="paper",
        notes=("The paper gives 1412 augmented samples on the t = 0.70 row only and leaves the "
               "cell blank for t = 0.85, 0.90, 0.95 (possibly one merged cell).",),
    )
    tibia = Table(
        name="paper_table3a_tibia",
        title="Paper Table 3a: tibia",
        body_part="tibia",
        rows=(
            r("baseline", "Baseline", None, 0, (0.618, 0.532, 0.705, 0.54, 0.652, 0.300), False),
            r("augmented", aug, None, 124, (0.640, 0.547, 0.732, 0.6, 0.542, 0.244), False),
            r("tl_g", tlg, None, 118, (0.642, 0.550, 0.735, 0.52, 0.66, 0.290), False),
            r("tl_g_tl_pl", tlgpl, None, 1264, (0.698, 0.610, 0.785, 0.74, 0.464, 0.066), True),
        ),
        baseline="baseline", n_test_pos=50, n_test_neg=500, source="paper",
        notes=("Table 3 has no t column; the paper's grid search chose t_tibia = 0.9 (section 5). "
               "TL_G: humerus translation model; TL_PL: humerus baseline as pseudo-labeller.",),
    )
    femur = Table(
        name="paper_table3b_femur",
        title="Paper Table 3b: femur",
        body_part="femur",
        rows=(
            r("baseline", "Baseline", None, 0, (0.533, 0.441, 0.627, 0.64, 0.376, 0.010), False),
            r("tl_g", tlg, None, 579, (0.601, 0.504, 0.695, 0.56, 0.61, 0.012), True),
            r("tl_g_tl_pl", tlgpl, None, 1342, (0.682, 0.594, 0.764, 0.66, 0.67, 0.008), True),
        ),
        baseline="baseline", n_test_pos=50, n_test_neg=500, source="paper",
        notes=("No femur translation model could be trained in the paper; t_femur = 0.95 "
               "(section 5).",),
    )
    return {"humerus": humerus, "tibia": tibia, "femur": femur}


# --------------------------------------------------------------------------- figures


def _roc_png(
    curves: Mapping[str, RocCurve | tuple[Any, Any, float]],
    *,
    title: str,
    points: Mapping[str, tuple[float, float]] | None,
    baseline: str | None,
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1.0, label="chance (AUC 0.5)")
    palette = [f"C{i}" for i in range(10)]
    colours = iter(palette * (1 + len(curves) // len(palette)))
    for label, (fpr, tpr, auc) in curves.items():
        is_base = label == baseline
        colour = "black" if is_base else next(colours)
        ax.plot(np.asarray(fpr), np.asarray(tpr), color=colour, linewidth=2.2 if is_base else 1.8,
                label=f"{label} (AUC {auc:.3f})", zorder=3)
        if points and label in points:
            x, y = points[label]
            ax.plot([x], [y], marker="o", markersize=6, color=colour,
                    markeredgecolor="white", zorder=4)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("\n".join(textwrap.wrap(title, width=60)), fontsize=11)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    if points:
        legend.set_title("dots: test (FPR, TPR) at the validation OP", prop={"size": 7})
    fig.subplots_adjust(left=0.12, right=0.96, bottom=0.1, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    return buf.getvalue()


def plot_roc(
    curves: Mapping[str, RocCurve | tuple[Any, Any, float]],
    out_png: str,
    *,
    title: str,
    points: Mapping[str, tuple[float, float]] | None = None,
    baseline: str | None = None,
) -> None:
    """One 6x6 in, 150 dpi ROC figure of every model in `curves` (label -> (fpr, tpr, auc)), with
    the chance diagonal and the AUCs in the legend; `points` (label -> (fpr, tpr)) marks operating
    points; the `baseline` label is drawn in black. Written atomically to `out_png` (any URI)."""
    if not curves:
        raise DataError(f"no ROC curves to plot for {out_png}")
    storage.write_bytes(out_png, _roc_png(curves, title=title, points=points, baseline=baseline))


def _curve_png(
    points: Sequence[CurvePoint], *, title: str, references: Mapping[str, float]
) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(7, 4.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.array([p.positives for p in points], dtype=np.float64)  # (P,)
    mean = np.array([p.auc.mean for p in points])  # (P,)
    sd = np.array([p.auc.sd or 0.0 for p in points])  # (P,)
    ax.errorbar(x, mean, yerr=sd, color="black", marker="o", markersize=6, linewidth=2.0,
                capsize=4, label="baseline: mean ± sd over seeds", zorder=3)
    dots_x = np.concatenate([[p.positives] * len(p.aucs) for p in points]).astype(np.float64)
    dots_y = np.concatenate([p.aucs for p in points])
    ax.scatter(dots_x, dots_y, s=18, color="C0", alpha=0.7, edgecolors="none", zorder=4,
               label="one training seed")
    for i, (label, auc) in enumerate(references.items()):
        ax.axhline(auc, color=f"C{i + 1}", linestyle="--", linewidth=1.3, label=label, zorder=2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{int(p.positives)}" + ("" if p.share is None else f"\n{_share(p.share)}")
                        for p in points], fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(x.min() / 1.4, x.max() * 1.4)
    ax.set_xlabel("Real training positives (log2 scale; share of the full set)")
    ax.set_ylabel("Test ROC AUC")
    ax.set_title("\n".join(textwrap.wrap(title, width=70)), fontsize=11)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("baseline"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="best", fontsize=8,
              framealpha=0.9)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.17, top=0.9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    return buf.getvalue()


def plot_learning_curve(
    points: Sequence[CurvePoint],
    out_png: str,
    *,
    title: str,
    references: Mapping[str, float] | None = None,
) -> None:
    """A 7x4.5 in, 150 dpi figure of test AUC against real training positives (x on a log2 scale,
    the counts as tick labels): mean ± sd over seeds, every seed as a dot, and `references`
    (label -> AUC, e.g. an arm at its chosen t) as dashed lines. Written atomically to `out_png`."""
    if not points:
        raise DataError(f"no learning-curve points to plot for {out_png}")
    storage.write_bytes(out_png, _curve_png(points, title=title, references=references or {}))


def _row_label(row: ReportRow, table: Table) -> str:
    """Legend label: type and t; the row key too when that pair is not unique in the table."""
    def plain(r: ReportRow) -> str:
        if r.t is None or r.type.lower() == "baseline":
            return r.type
        return f"{r.type}, t = {_fmt_t(r.t)}"

    label = plain(row)
    if sum(plain(r) == label for r in table.rows) > 1:
        label = f"{label} [{row.key}]"
    return label


# --------------------------------------------------------------------------- the report


def report_uri(run_uri: str) -> str:
    """Where a run's report lives: <run_uri>/report."""
    return storage.join(run_uri, REPORT_DIR)


def _write_roc(
    uri: str,
    table: Table,
    curves: Mapping[str, RocCurve | tuple[Any, Any, float]],
    *,
    suffix: str = "",
) -> None:
    """The ROC figure of `table`'s models that have curves, labelled by type and t."""
    rows = {row.key: row for row in table.rows}
    labelled = {_row_label(rows[k], table) if k in rows else k: c for k, c in curves.items()}
    points = {
        _row_label(row, table): (1.0 - row.spec, row.sens)
        for row in table.rows
        if row.key in curves and row.sens is not None and row.spec is not None
    }
    base = _row_label(rows[table.baseline], table) if table.baseline in rows else None
    counts = f" ({table.n_test_pos}:{table.n_test_neg})" if table.n_test_pos is not None else ""
    plot_roc(labelled, uri, title=f"{table.body_part}: ROC on the test set{counts}{suffix}",
             points=points, baseline=base)


def _finish_report(
    out: str, run_uri: str, markdown: str, tables: Sequence[Table], figures: Sequence[str],
    parts: Sequence[dict[str, Any]] = (),
) -> str:
    """report.md, metrics.json, then the manifest (last). Returns the markdown."""
    storage.write_text(storage.join(out, "report.md"), markdown)
    metrics = {"schema": METRICS_SCHEMA, "run_uri": run_uri,
               "tables": [to_json(t) for t in tables], "parts": list(parts)}
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    storage.publish_manifest(out, {"files": ["report.md", "metrics.json", *figures],
                                   "tables": [t.name for t in tables]})
    return markdown


def write_report(
    run_uri: str,
    tables: Sequence[Table],
    *,
    curves: Mapping[str, Mapping[str, RocCurve | tuple[Any, Any, float]]] | None = None,
    paper: Mapping[str, Table] | None = None,
) -> str:
    """Write <run_uri>/report/{report.md, metrics.json, roc_<table.name>.png} and a manifest last,
    one section per table (no aggregation over seeds: `render_report_from_predictions` does that).

    curves[table.name][row key] = (fpr, tpr, auc) of that model on the test set; a table without
    curves gets no figure. paper[table.body_part], when given, adds a side-by-side comparison.
    Returns the markdown.
    """
    out = report_uri(run_uri)
    curves = curves or {}
    paper = paper or {}
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise DataError(f"table names must be unique (they name the figures), got {names}")
    parts = ["# boneaug report", "", f"Run: `{run_uri}`", ""]
    written = []
    for table in tables:
        parts.append(to_markdown(table, paper=paper.get(table.body_part)))
        if curves.get(table.name):
            png = f"roc_{table.name}.png"
            _write_roc(storage.join(out, png), table, curves[table.name])
            written.append(png)
            parts.append(f"![ROC curves, {table.title}]({png})\n")
    markdown = "\n".join(parts).rstrip() + "\n"
    return _finish_report(out, run_uri, markdown, tables, written)


def _curve_references(part: PartReport) -> dict[str, float]:
    return {f"{c.type} at the chosen t (mean)": c.auc.mean for c in part.chosen}


def _write_part_figures(
    out: str, part: PartReport, curves: Mapping[str, RocCurve] | None
) -> dict[str, str]:
    """roc_<part>.png (lowest seed) and learning_curve_<part>.png; kind -> file name."""
    figures = {}
    if curves:
        png = f"roc_{part.body_part}.png"
        suffix = f", training seed {part.seeds[0]}" if len(part.tables) > 1 else ""
        _write_roc(storage.join(out, png), _main_view(part.tables[0]), curves, suffix=suffix)
        figures["roc"] = png
    if part.curve:
        png = f"learning_curve_{part.body_part}.png"
        plot_learning_curve(part.curve, storage.join(out, png),
                            title=f"{part.body_part}: baseline test AUC against real positives",
                            references=_curve_references(part))
        figures["learning_curve"] = png
    return figures


def _part_json(part: PartReport) -> dict[str, Any]:
    """A body part's aggregates as JSON-ready data (its tables are listed by name)."""
    return {
        "body_part": part.body_part,
        "seeds": list(part.seeds),
        "tables": [t.name for t in part.tables],
        "arms": [dataclasses.asdict(a) for a in part.arms],
        "chosen": [dataclasses.asdict(c) for c in part.chosen],
        "learning_curve": [dataclasses.asdict(p) for p in part.curve],
        "bands": None if part.bands is None else dataclasses.asdict(part.bands),
        "training": None if part.training is None else _training_json(part.training),
    }


def _training_json(training: TrainingHealth) -> dict[str, Any]:
    return {"seeds": [dataclasses.asdict(r) | {"loss_fall": r.loss_fall, "val_rise": r.val_rise}
                      for r in training.seeds],
            "agreement": [a._asdict() for a in training.agreement]}


def write_part_reports(
    run_uri: str,
    parts: Sequence[PartReport],
    *,
    curves: Mapping[str, Mapping[str, RocCurve]] | None = None,
    paper: Mapping[str, Table] | None = None,
) -> str:
    """Write <run_uri>/report/ for body parts aggregated over seeds: report.md (`part_markdown`),
    metrics.json (every seed's table and every part's aggregates), the figures, the manifest last.
    curves[body_part][row key]: the lowest seed's test ROC curves. Returns the markdown."""
    out = report_uri(run_uri)
    curves, paper = curves or {}, paper or {}
    sections = ["# boneaug report", "", f"Run: `{run_uri}`", ""]
    written: list[str] = []
    for part in parts:
        figures = _write_part_figures(out, part, curves.get(part.body_part))
        written.extend(figures.values())
        sections.append(part_markdown(part, paper=paper.get(part.body_part), figures=figures))
    markdown = "\n".join(sections).rstrip() + "\n"
    tables = [t for part in parts for t in part.tables]
    return _finish_report(out, run_uri, markdown, tables, written,
                          [_part_json(part) for part in parts])


# --------------------------------------------------------------------------- stored predictions


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise DataError(
            f"model key {key!r} is not file-name safe: use letters, digits, '.', '_' and '-' "
            "(e.g. 'humerus-aug-t0.90')"
        )


def read_index(run_uri: str) -> dict[str, ModelMeta]:
    """<run_uri>/predictions/index.json as model_key -> ModelMeta (in the file's order)."""
    uri = storage.join(run_uri, PREDICTIONS_DIR, INDEX_NAME)
    if not storage.exists(uri):
        raise DataError(
            f"{uri} does not exist: no stored predictions for run {run_uri} "
            "(models write them with boneaug.eval.report.write_predictions)"
        )
    try:
        data = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != PREDICTIONS_SCHEMA:
        raise DataError(f"{uri}: expected schema {PREDICTIONS_SCHEMA!r}, got {data.get('schema')!r}"
                        if isinstance(data, dict) else f"{uri} must hold a JSON object")
    allowed = {f.name for f in dataclasses.fields(ModelMeta)}
    out = {}
    for key, entry in data.get("models", {}).items():
        _check_key(key)
        unknown = set(entry) - allowed
        if unknown or "type" not in entry:
            raise DataError(
                f"{uri}: model {key!r} has unknown fields {sorted(unknown)} or no 'type'"
            )
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        out[key] = _checked_meta(uri, key, ModelMeta(**fields))
    return out


def _checked_meta(uri: str, key: str, meta: ModelMeta) -> ModelMeta:
    """The new fields' types (JSON has no int/bool distinction that Python would catch)."""
    if isinstance(meta.seed, bool) or not isinstance(meta.seed, int):
        raise DataError(f"{uri}: model {key!r} has seed {meta.seed!r}; expected an integer")
    if meta.positives is not None and (isinstance(meta.positives, bool)
                                       or not isinstance(meta.positives, int)
                                       or meta.positives < 0):
        raise DataError(f"{uri}: model {key!r} has positives {meta.positives!r}; expected a "
                        "non-negative integer or null")
    if not isinstance(meta.learning_curve, bool) or not isinstance(meta.baseline, bool):
        raise DataError(f"{uri}: model {key!r}: baseline and learning_curve must be true/false")
    if meta.baseline and meta.learning_curve:
        raise DataError(f"{uri}: model {key!r} is both the baseline and a learning-curve model; "
                        "the baseline is the curve's 100 % point: set learning_curve false")
    return meta


def write_predictions(
    run_uri: str,
    model_key: str,
    meta: ModelMeta,
    *,
    image_ids: Sequence[str],
    splits: Sequence[str],
    labels: Any,
    scores: Any,
) -> str:
    """Store one model's val and test scores in the layout above and register it in index.json.

    Rewrites index.json (read, add/replace this key, write atomically): one writer at a time.
    Returns the Parquet URI.
    """
    import pyarrow as pa

    _check_key(model_key)
    n = len(image_ids)
    labels_arr = np.asarray(labels)
    scores_arr = np.asarray(scores, dtype=np.float64)
    if not (len(splits) == labels_arr.shape[0] == scores_arr.shape[0] == n):
        raise DataError(
            f"model {model_key!r}: image_ids ({n}), splits ({len(splits)}), labels "
            f"({labels_arr.shape[0]}) and scores ({scores_arr.shape[0]}) must have the same length"
        )
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise DataError(f"model {model_key!r}: splits must be 'val' or 'test', found {bad}")
    table = pa.table({
        "image_id": pa.array([str(i) for i in image_ids], pa.string()),
        "split": pa.array(list(splits), pa.string()),
        "label": pa.array(labels_arr.astype(np.int8), pa.int8()),
        "score": pa.array(scores_arr, pa.float64()),
    })
    uri = storage.join(run_uri, PREDICTIONS_DIR, f"{model_key}.parquet")
    storage.write_parquet(uri, table)
    index_uri = storage.join(run_uri, PREDICTIONS_DIR, INDEX_NAME)
    models: dict[str, Any] = {}
    if storage.exists(index_uri):
        models = {k: dataclasses.asdict(v) for k, v in read_index(run_uri).items()}
    models[model_key] = dataclasses.asdict(meta)
    storage.write_text(index_uri, json.dumps({"schema": PREDICTIONS_SCHEMA, "models": models},
                                             indent=2))
    return uri


def import_predictions(run_uri: str, model_key: str, meta: ModelMeta, source_uri: str) -> str:
    """Register a classifier run's ``predictions.parquet`` (image_id, split, label, score, as
    `boneaug.train.classifier` writes it) under `run_uri` as `model_key`. Returns the new URI."""
    table = storage.read_parquet(source_uri)
    missing = {"image_id", "split", "label", "score"} - set(table.column_names)
    if missing:
        raise DataError(f"{source_uri} lacks column(s) {sorted(missing)}")
    return write_predictions(
        run_uri, model_key, meta,
        image_ids=table.column("image_id").to_pylist(),
        splits=table.column("split").to_pylist(),
        labels=table.column("label").to_numpy(),
        scores=table.column("score").to_numpy(),
    )


def read_predictions(
    run_uri: str, model_key: str
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (image_ids, labels, scores), each sorted by image_id, for one stored model."""
    _check_key(model_key)
    uri = storage.join(run_uri, PREDICTIONS_DIR, f"{model_key}.parquet")
    table = storage.read_parquet(uri)
    missing = {"image_id", "split", "label", "score"} - set(table.column_names)
    if missing:
        raise DataError(f"{uri} lacks column(s) {sorted(missing)}")
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    scores = table.column("score").to_numpy().astype(np.float64)
    out = {}
    for name in SPLITS:
        sel = split == name
        if not sel.any():
            raise DataError(f"{uri} has no rows with split {name!r}: store val and test scores")
        sid = ids[sel]
        if len(set(sid)) != sid.size:
            raise DataError(f"{uri}: image_id repeats within split {name!r}")
        order = np.argsort(sid.astype(str), kind="stable")
        out[name] = (sid[order], labels[sel][order], scores[sel][order])
    return out


def write_conspicuity(run_uri: str, image_ids: Sequence[str], conspicuity: Any) -> str:
    """Store <run_uri>/predictions/conspicuity.parquet: image_id, conspicuity (float32 in [0, 1];
    None or NaN, stored as null, for negatives). Returns its URI."""
    import pyarrow as pa

    ids = [str(i) for i in image_ids]
    values = np.array([np.nan if v is None else v for v in conspicuity], dtype=np.float64)  # (N,)
    uri = storage.join(run_uri, PREDICTIONS_DIR, CONSPICUITY_NAME)
    if values.shape != (len(ids),):
        raise DataError(f"{uri}: {len(ids)} image ids but {values.shape[0]} conspicuity values")
    _check_conspicuity(uri, ids, values)
    null = np.isnan(values)
    storage.write_parquet(uri, pa.table({
        "image_id": pa.array(ids, pa.string()),
        "conspicuity": pa.array(values.astype(np.float32), pa.float32(), mask=null),
    }))
    return uri


def _check_conspicuity(uri: str, ids: Sequence[str], values: np.ndarray) -> None:
    if len(set(ids)) != len(ids):
        raise DataError(f"{uri}: image_id repeats; give each image one conspicuity")
    bad = ~np.isnan(values) & ((values < 0) | (values > 1) | ~np.isfinite(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{uri}: conspicuity must lie in [0, 1] (or be null), image {ids[i]!r} "
                        f"has {values[i]}")


def read_conspicuity(run_uri: str) -> dict[str, float] | None:
    """image_id -> conspicuity (NaN where null) from <run_uri>/predictions/conspicuity.parquet, or
    None when the run has no such file."""
    uri = storage.join(run_uri, PREDICTIONS_DIR, CONSPICUITY_NAME)
    if not storage.exists(uri):
        return None
    table = storage.read_parquet(uri)
    missing = {"image_id", "conspicuity"} - set(table.column_names)
    if missing:
        raise DataError(f"{uri} lacks column(s) {sorted(missing)}")
    ids = [str(i) for i in table.column("image_id").to_pylist()]
    values = np.array([np.nan if v is None else v for v in table.column("conspicuity").to_pylist()],
                      dtype=np.float64)
    _check_conspicuity(uri, ids, values)
    return dict(zip(ids, values.tolist(), strict=True))


def _load_part(run_uri: str, keys: Sequence[str]) -> tuple[dict[str, Predictions], np.ndarray]:
    """The predictions of one body part's models, their test sets aligned by image_id, and the
    (N,) test image ids."""
    loaded = {key: read_predictions(run_uri, key) for key in keys}
    ref_key = keys[0]
    ref_ids, ref_labels, _ = loaded[ref_key]["test"]
    out: dict[str, Predictions] = {}
    for key in keys:
        ids, labels, scores = loaded[key]["test"]
        if ids.shape != ref_ids.shape or not np.array_equal(ids, ref_ids):
            extra = sorted(set(ids) ^ set(ref_ids))[:3]
            raise DataError(
                f"models {ref_key!r} and {key!r} were scored on different test images "
                f"(e.g. {extra}): a paired comparison needs the same test set"
            )
        if not np.array_equal(labels, ref_labels):
            raise DataError(f"models {ref_key!r} and {key!r} disagree on test labels")
        _, val_labels, val_scores = loaded[key]["val"]
        out[key] = (val_labels, val_scores, labels, scores)
    return out, ref_ids


_PAPER_REFS = {"humerus": "cf. paper Table 2", "tibia": "cf. paper Table 3a",
               "femur": "cf. paper Table 3b"}


def _group_parts(run_uri: str, index: Mapping[str, ModelMeta]) -> dict[str, list[str]]:
    """body part -> model keys, body parts in BODY_PARTS order, then the others sorted."""
    by_part: dict[str, list[str]] = {}
    for key, meta in index.items():
        if not meta.body_part:
            raise DataError(f"model {key!r} in the prediction index has no body_part")
        if not _KEY_RE.match(meta.body_part):
            raise DataError(f"model {key!r}: body_part {meta.body_part!r} is not file-name safe "
                            "(it names the report's figures)")
        by_part.setdefault(meta.body_part, []).append(key)
    if not by_part:
        raise DataError(f"{run_uri}/{PREDICTIONS_DIR}/{INDEX_NAME} lists no models")
    ordered = [p for p in BODY_PARTS if p in by_part]
    ordered += sorted(p for p in by_part if p not in BODY_PARTS)
    return {part: by_part[part] for part in ordered}


def _seed_groups(part: str, keys: Sequence[str], index: Mapping[str, ModelMeta]
                 ) -> dict[int, list[str]]:
    """training seed -> that seed's model keys, its one baseline first; seeds ascending."""
    by_seed: dict[int, list[str]] = {}
    for key in keys:
        by_seed.setdefault(index[key].seed, []).append(key)
    out = {}
    for seed in sorted(by_seed):
        baselines = [k for k in by_seed[seed] if index[k].baseline]
        if len(baselines) != 1:
            found = ", ".join(repr(k) for k in baselines) or "none"
            raise DataError(
                f"body part {part!r}, training seed {seed}: needs exactly one model with "
                f"\"baseline\": true in the prediction index, found {found}"
            )
        out[seed] = baselines + [k for k in by_seed[seed] if k != baselines[0]]
    return out


def _band_input(
    test_ids: np.ndarray, predictions: Mapping[str, Predictions],
    conspicuity: Mapping[str, float] | None,
) -> BandInput | None:
    """The test set's conspicuity, aligned to `test_ids`; None when no test positive has one."""
    if conspicuity is None:
        return None
    labels = np.asarray(next(iter(predictions.values()))[2])  # (N,)
    values = np.array([conspicuity.get(str(i), np.nan) for i in test_ids], dtype=np.float64)
    if not np.isfinite(values[labels == 1]).any():
        return None
    return BandInput(labels=labels, conspicuity=values,
                     scores={key: np.asarray(p[3]) for key, p in predictions.items()})


def _evaluate_part(
    run_uri: str, part: str, keys: Sequence[str], index: Mapping[str, ModelMeta],
    config: EvalConfig, *, conspicuity: Mapping[str, float] | None, min_gain: float,
) -> tuple[PartReport, dict[str, RocCurve]]:
    """One table per training seed, the part's aggregates, and the lowest seed's ROC curves."""
    groups = _seed_groups(part, keys, index)
    predictions, test_ids = _load_part(run_uri, [k for ks in groups.values() for k in ks])
    ref = _PAPER_REFS.get(part)
    title = f"{part}: lesion classification on the test set" + (f" ({ref})" if ref else "")
    tables = [
        evaluate_models({k: predictions[k] for k in ks}, baseline=ks[0], config=config,
                        meta=index, name=part if len(groups) == 1 else f"{part}-s{seed}",
                        title=title, body_part=part)
        for seed, ks in groups.items()
    ]
    training = training_health({seed: (index[ks[0]], predictions[ks[0]][3])
                                for seed, ks in groups.items()})
    report = summarize_part(tables, min_gain=min_gain,
                            bands=_band_input(test_ids, predictions, conspicuity),
                            training=training)
    lowest = _main_view(report.tables[0])
    return report, roc_curves({row.key: predictions[row.key] for row in lowest.rows})


def render_report_from_predictions(
    run_uri: str, config: EvalConfig, *, compare_paper: bool = True, min_gain: float = MIN_GAIN
) -> str:
    """Rebuild <run_uri>/report/ from the stored predictions (layout in the module docstring):
    per body part, one table per training seed, aggregated by `part_markdown` (mean ± sd over
    seeds, paired ΔAUC per seed, the validation-chosen t with the seeds where ΔAUC >= `min_gain`
    with its CI above 0, learning curve, conspicuity bands), the ROC figure of the lowest seed, and
    the paper's numbers when `compare_paper`. Returns the markdown of report.md. This is what
    `boneaug report RUN_URI` runs.
    """
    index = read_index(run_uri)
    if not index:
        raise DataError(f"{run_uri}/{PREDICTIONS_DIR}/{INDEX_NAME} lists no models")
    conspicuity = read_conspicuity(run_uri)
    parts, curves = [], {}
    for part, keys in _group_parts(run_uri, index).items():
        report, roc = _evaluate_part(run_uri, part, keys, index, config,
                                     conspicuity=conspicuity, min_gain=min_gain)
        parts.append(report)
        curves[part] = roc
    return write_part_reports(run_uri, parts, curves=curves,
                              paper=paper_tables() if compare_paper else None)
