"""Result tables in the paper's layout (Tables 2 and 3), ROC figures, and the run report.

A run's report is rebuilt from stored predictions alone, so it can be re-rendered at any time
(`boneaug report RUN_URI` calls `render_report_from_predictions`). The layout, under any run URI
(s3://..., file://..., a path):

    <run_uri>/predictions/index.json           which models there are, and what they are
    <run_uri>/predictions/<model_key>.parquet  one row per scored image:
        image_id string | split string ("val" | "test") | label int8 (1 = lesion) | score float64
    <run_uri>/report/report.md                 the tables, paired differences, paper comparison
    <run_uri>/report/metrics.json              the same numbers as data (`to_json` / `from_json`)
    <run_uri>/report/roc_<table name>.png      test-set ROC curves of every model of a table
    <run_uri>/report/_MANIFEST.json            written last: the report is complete

index.json:

    {"schema": "boneaug.predictions/1",
     "models": {"<model_key>": {"type": "Baseline" | "Augmented" | "TL_G" | "TL_G + TL_PL" | ...,
                                "t": 0.9 | null, "augmented_samples": 1412,
                                "model_name": "boneaug-drn-humerus-aug", "model_version": "3",
                                "body_part": "humerus", "baseline": false}, ...}}

model_key is a file-name-safe id ([A-Za-z0-9._-], e.g. "humerus-aug-t0.90"). One table is made per
body part; exactly one model per body part has "baseline": true. Every model of a body part must be
scored on the same test images (matched by image_id); the bootstrap is paired on them. Producers
write this layout with `write_predictions`, or `import_predictions` from a classifier run's
predictions.parquet (one writer at a time: each call rewrites index.json).
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
    "ModelMeta",
    "ReportRow",
    "RocCurve",
    "Table",
    "evaluate_models",
    "from_json",
    "import_predictions",
    "paper_tables",
    "plot_roc",
    "read_index",
    "read_predictions",
    "render_report_from_predictions",
    "report_uri",
    "roc_curves",
        "to_json",
    "to_markdown",
    "write_predictions",
    "write_report",
]

PREDICTIONS_DIR = "predictions"
INDEX_NAME = "index.json"
REPORT_DIR = "report"
PREDICTIONS_SCHEMA = "boneaug.predictions/1"
TABLE_SCHEMA = "boneaug.table/1"
METRICS_SCHEMA = "boneaug.report/1"
SPLITS = ("val", "test")
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


@dataclass(frozen=True)
class Table:
    """A results table for one body part. `name` is file-name safe (used for roc_<name>.png)."""

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


# --------------------------------------------------------------------------- evaluation


def _labels01(values: Any, where: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64) if arr.dtype == bool else arr


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
    """One table: every model's test AUC with a bootstrap CI on shared replicates, the paired
    difference against `baseline`, and sensitivity/specificity on test at the validation OP.

    predictions[key] = (val_labels, val_scores, test_labels, test_scores). All models must share
    the same test labels in the same order (the same images): the bootstrap is paired.
    Rows: the baseline first, then the others in the mapping's order.
    """
    if baseline not in predictions:
        raise DataError(f"baseline {baseline!r} is not among the models {sorted(predictions)}")
    meta = meta or {}
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
    results = bootstrap_auc(
        test_labels,
        {key: pred[3] for key, pred in predictions.items()},
        n_replicates=config.n_bootstrap,
        seed=config.seed,
        ci=config.ci,
        baseline=baseline,
    )
    order = [baseline] + [k for k in predictions if k != baseline]
    rows = []
    for key in order:
        val_labels, val_scores, _, test_scores = predictions[key]
        op = operating_point(val_labels, val_scores)
        sens, spec = sens_spec(test_labels, test_scores, op)
        info = meta.get(key, ModelMeta(type="Baseline" if key == baseline else key))
        rows.append(
            ReportRow(
                key=key, type=info.type, t=info.t, augmented_samples=info.augmented_samples,
                model_name=info.model_name, model_version=info.model_version,
                auc=results[key], sens=sens, spec=spec, op=op,
            )
        )
    n_pos = int((test_labels == 1).sum())
    part = body_part or meta.get(baseline, ModelMeta(type="")).body_part or "unknown"
    return Table(
        name=name or part,
        title=title or f"{part}: lesion classification on the test set",
        body_part=part,
        rows=tuple(rows),
        baseline=baseline,
        n_test_pos=n_pos,
        n_test_neg=int(test_labels.size - n_pos),
        seed=config.seed,
    )


def roc_curves(predictions: Mapping[str, Predictions]) -> dict[str, RocCurve]:
    """Test-set ROC curve and AUC of every model, keyed like `predictions`."""
    out = {}
    for key, (_, _, labels, scores) in predictions.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        out[key] = RocCurve(fpr, tpr, roc_auc(labels, scores))
    return out


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


def to_markdown(table: Table, *, paper: Table | None = None) -> str:
    """The table in the paper's layout (Type | t | Augmented samples | ROC AUC (CI 95 %) | Sens. |
    Spec. | OP), then the paired differences against the baseline, then (with `paper=`) a
    side-by-side comparison with the paper's numbers.

    As in the paper: bold marks the highest AUC in the table, * a significant difference from the
    baseline (the CI of the paired bootstrap AUC difference excludes 0, in either direction).
    """
    ci_label = _ci_label(table)
    best = _best_keys(table)
    lines = [
        f"### {table.title}",
        "",
        f"| Type | t | Augmented samples | ROC AUC ({ci_label}) | Sens. | Spec. | OP |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.rows:
        cells = [
            _cell(row.type), _fmt_t(row.t), _fmt_int(row.augmented_samples),
            _auc_cell(row, row.key in best), _fmt(row.sens), _fmt(row.spec), _fmt(row.op),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(_legend(table))
    lines.append("")
    diffs = [row for row in table.rows if row.auc.diff is not None]
    if diffs:
        base = table.row(table.baseline).type if table.baseline else "baseline"
        lines += [
            f"Paired AUC difference against the baseline ({base}), "
            "on the same bootstrap replicates:",
            "",
            f"| Type | t | ΔAUC ({ci_label}) | p (two-sided, bootstrap) | significant | model |",
            "|---|---|---|---|---|---|",
        ]
        for row in diffs:
            a = row.auc
            model = row.model_name or row.key
            if row.model_version:
                model = f"{model} v{row.model_version}"
            lines.append(
                f"| {_cell(row.type)} | {_fmt_t(row.t)} | {a.diff:+.3f} "
                f"({a.diff_ci_low:+.3f} to {a.diff_ci_high:+.3f}) | "
                f"{_fmt_p(a.p_value, a.n_replicates)} | {'yes' if a.significant else 'no'} | "
                f"{_cell(model)} |"
            )
        lines.append("")
    if table.source != "paper":
        lines.extend(f"Note: {note}" for note in table.notes)
    else:
        lines.extend(f"Paper note: {note}" for note in table.notes)
    if table.notes:
        lines.append("")
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


def _paper_row(
    key: str, type_: str, t: float | None, samples: int | None,
    auc: float, low: float, high: float, sens: float, spec: float, op: float, significant: bool,
) -> ReportRow:
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
            r("baseline", "Baseline", 0.0, 0, 0.876, 0.817, 0.926, 0.9, 0.776, 0.455, False),
            r("augmented_t0.70", aug, 0.70, 1412, 0.882, 0.829, 0.928, 0.80, 0.842, 0.390, False),
            r("augmented_t0.85", aug, 0.85, None, 0.899, 0.854, 0.939, 0.82, 0.802, 0.086, False),
            r("augmented_t0.90", aug, 0.90, None, 0.924, 0.889, 0.955, 0.84, 0.798, 0.058, True),
            r("augmented_t0.95", aug, 0.95, None, 0.877, 0.820, 0.926, 0.90, 0.766, 0.273, False),
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
            r("baseline", "Baseline", None, 0, 0.618, 0.532, 0.705, 0.54, 0.652, 0.300, False),
            r("augmented", aug, None, 124, 0.640, 0.547, 0.732, 0.6, 0.542, 0.244, False),
            r("tl_g", tlg, None, 118, 0.642, 0.550, 0.735, 0.52, 0.66, 0.290, False),
            r("tl_g_tl_pl", tlgpl, None, 1264, 0.698, 0.610, 0.785, 0.74, 0.464, 0.066, True),
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
            r("baseline", "Baseline", None, 0, 0.533, 0.441, 0.627, 0.64, 0.376, 0.010, False),
            r("tl_g", tlg, None, 579, 0.601, 0.504, 0.695, 0.56, 0.61, 0.012, True),
            r("tl_g_tl_pl", tlgpl, None, 1342, 0.682, 0.594, 0.764, 0.66, 0.67, 0.008, True),
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


def write_report(
    run_uri: str,
    tables: Sequence[Table],
    *,
    curves: Mapping[str, Mapping[str, RocCurve | tuple[Any, Any, float]]] | None = None,
    paper: Mapping[str, Table] | None = None,
) -> str:
    """Write <run_uri>/report/{report.md, metrics.json, roc_<table.name>.png} and a manifest last.

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
        if table.name in curves and curves[table.name]:
            png = f"roc_{table.name}.png"
            rows = {row.key: row for row in table.rows}
            labelled = {_row_label(rows[k], table) if k in rows else k: c
                        for k, c in curves[table.name].items()}
            points = {
                _row_label(row, table): (1.0 - row.spec, row.sens)
                for row in table.rows
                if row.key in curves[table.name] and row.sens is not None and row.spec is not None
            }
            base = _row_label(rows[table.baseline], table) if table.baseline in rows else None
            counts = (f" ({table.n_test_pos}:{table.n_test_neg})"
                      if table.n_test_pos is not None else "")
            plot_roc(labelled, storage.join(out, png),
                     title=f"{table.body_part}: ROC on the test set{counts}",
                     points=points, baseline=base)
            written.append(png)
            parts.append(f"![ROC curves, {table.title}]({png})\n")
    markdown = "\n".join(parts).rstrip() + "\n"
    storage.write_text(storage.join(out, "report.md"), markdown)
    metrics = {"schema": METRICS_SCHEMA, "run_uri": run_uri, "tables": [to_json(t) for t in tables]}
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    storage.publish_manifest(out, {"files": ["report.md", "metrics.json", *written],
                                   "tables": names})
    return markdown


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
        out[key] = ModelMeta(**entry)
    return out


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


def _load_part(run_uri: str, keys: Sequence[str]) -> dict[str, Predictions]:
    """The predictions of one body part's models, their test sets aligned by image_id."""
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
    return out


_PAPER_REFS = {"humerus": "cf. paper Table 2", "tibia": "cf. paper Table 3a",
               "femur": "cf. paper Table 3b"}


def render_report_from_predictions(
    run_uri: str, config: EvalConfig, *, compare_paper: bool = True
) -> str:
    """Rebuild <run_uri>/report/ from the stored predictions (layout in the module docstring):
    one table and one ROC figure per body part, compared with the paper's numbers when
    `compare_paper`. Returns the markdown of report.md. This is what `boneaug report RUN_URI` runs.
    """
    index = read_index(run_uri)
    if not index:
        raise DataError(f"{run_uri}/{PREDICTIONS_DIR}/{INDEX_NAME} lists no models")
    by_part: dict[str, list[str]] = {}
    for key, meta in index.items():
        if not meta.body_part:
            raise DataError(f"model {key!r} in the prediction index has no body_part")
        by_part.setdefault(meta.body_part, []).append(key)
    ordered = [p for p in BODY_PARTS if p in by_part]
    ordered += sorted(p for p in by_part if p not in BODY_PARTS)
    tables, curves = [], {}
    for part in ordered:
        keys = by_part[part]
        baselines = [k for k in keys if index[k].baseline]
        if len(baselines) != 1:
            raise DataError(
                f"body part {part!r} needs exactly one model with \"baseline\": true in the "
                f"prediction index, found {baselines or 'none'}"
            )
        predictions = _load_part(run_uri, baselines + [k for k in keys if k != baselines[0]])
        ref = _PAPER_REFS.get(part)
        title = f"{part}: lesion classification on the test set" + (f" ({ref})" if ref else "")
        table = evaluate_models(predictions, baseline=baselines[0], config=config,
                                meta=index, name=part, title=title, body_part=part)
        tables.append(table)
        curves[table.name] = roc_curves(predictions)
    return write_report(run_uri, tables, curves=curves,
                        paper=paper_tables() if compare_paper else None)
