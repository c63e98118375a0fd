"""eval.report: tables from predictions, markdown in the paper's layout, JSON, the paper's numbers,
ROC figures, and a report re-rendered from stored predictions (local path and S3)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneaug import storage
from boneaug.config import EvalConfig
from boneaug.errors import DataError
from boneaug.eval.metrics import bootstrap_auc, operating_point, sens_spec
from boneaug.eval.report import (
    ModelMeta,
    evaluate_models,
    from_json,
    import_predictions,
    paper_tables,
    plot_roc,
    read_index,
    render_report_from_predictions,
    roc_curves,
    to_json,
    to_markdown,
    write_predictions,
)

CONFIG = EvalConfig(n_bootstrap=400, ci=0.95, seed=0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split_labels(n_val: tuple[int, int], n_test: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    val = np.r_[np.ones(n_val[0], np.int64), np.zeros(n_val[1], np.int64)]
    test = np.r_[np.ones(n_test[0], np.int64), np.zeros(n_test[1], np.int64)]
    return val, test


def _predictions(seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    """A baseline and two augmented models sharing val/test sets; 'aug90' is clearly better."""
    rng = np.random.default_rng(seed)
    val, test = _split_labels((20, 200), (50, 500))
    shared_val, shared_test = rng.normal(size=val.size), rng.normal(size=test.size)
    out = {}
    for key, push in (("base", 1.0), ("aug70", 1.1), ("aug90", 2.0)):
        out[key] = (val, 1 / (1 + np.exp(-(push * val + shared_val - 1.0))),
                    test, 1 / (1 + np.exp(-(push * test + shared_test - 1.0))))
    return out


META = {
    "base": ModelMeta("Baseline", None, 0, "boneaug-drn-humerus", "1", "humerus", True),
    "aug70": ModelMeta("Augmented", 0.70, 1500, "boneaug-drn-humerus-aug", "2", "humerus"),
    "aug90": ModelMeta("Augmented", 0.90, 700, "boneaug-drn-humerus-aug", "3", "humerus"),
}


def test_evaluate_models_rows_follow_the_metrics() -> None:
    preds = _predictions()
    table = evaluate_models(preds, baseline="base", config=CONFIG, meta=META, name="humerus",
                            body_part="humerus")
    assert [r.key for r in table.rows] == ["base", "aug70", "aug90"]
    assert (table.n_test_pos, table.n_test_neg, table.seed) == (50, 500, 0)
    expected = bootstrap_auc(preds["base"][2], {k: v[3] for k, v in preds.items()},
                             n_replicates=400, seed=0, baseline="base")
    for row in table.rows:
        val_labels, val_scores, test_labels, test_scores = preds[row.key]
        assert row.auc == expected[row.key]
        assert row.op == operating_point(val_labels, val_scores)
        assert (row.sens, row.spec) == sens_spec(test_labels, test_scores, row.op)
    assert table.row("aug90").auc.significant and table.row("aug90").auc.diff > 0.03
    assert table.row("aug90").augmented_samples == 700 and table.row("aug70").t == 0.70
    assert table.row("base").type == "Baseline" and table.row("base").auc.diff is None


def test_evaluate_models_refuses_unpaired_test_sets() -> None:
    preds = _predictions()
    val_l, val_s, test_l, test_s = preds["aug70"]
    preds["aug70"] = (val_l, val_s, test_l[::-1], test_s)
    with pytest.raises(DataError, match="'aug70' was scored on other test labels"):
        evaluate_models(preds, baseline="base", config=CONFIG)
    with pytest.raises(DataError, match="baseline 'nope' is not among"):
        evaluate_models(_predictions(), baseline="nope", config=CONFIG)


def test_markdown_of_the_paper_tables_has_the_paper_rows() -> None:
    tables = paper_tables()
    md = to_markdown(tables["humerus"])
    assert "| Type | t | Augmented samples | ROC AUC (CI 95 %) | Sens. | Spec. | OP |" in md
    assert "| Baseline | 0 | 0 | 0.876 (0.817-0.926) | 0.900 | 0.776 | 0.455 |" in md
    assert "| Augmented | 0.70 | 1412 | 0.882 (0.829-0.928) | 0.800 | 0.842 | 0.390 |" in md
    # the best row is bold and, being significant, starred
    assert "| Augmented | 0.90 | – | **0.924 (0.889-0.955)**\\* | 0.840 | 0.798 | 0.058 |" in md
    femur = to_markdown(tables["femur"])
    # significant but not the best: starred, not bold (as in the paper)
    assert "| TL_G | – | 579 | 0.601 (0.504-0.695)\\* | 0.560 | 0.610 | 0.012 |" in femur
    assert ("| TL_G + TL_PL | – | 1342 | **0.682 (0.594-0.764)**\\* | 0.660 | 0.670 | 0.008 |"
            in femur)


def test_markdown_of_an_evaluated_table_and_the_paper_comparison() -> None:
    table = evaluate_models(_predictions(), baseline="base", config=CONFIG, meta=META,
                            name="humerus", body_part="humerus", title="humerus test")
    md = to_markdown(table, paper=paper_tables()["humerus"])
    best = table.row("aug90")
    a = best.auc
    row = (f"| Augmented | 0.90 | 700 | **{a.auc:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})**\\* | "
           f"{best.sens:.3f} | {best.spec:.3f} | {best.op:.3f} |")
    assert row in md
    assert "Test set 50:500 (lesion:non-lesion); 400 stratified bootstrap replicates (seed 0)" in md
    assert (f"| Augmented | 0.90 | {a.diff:+.3f} ({a.diff_ci_low:+.3f} to {a.diff_ci_high:+.3f}) |"
            in md)
    assert "boneaug-drn-humerus-aug v3" in md
    # side by side: our cell, then the paper's, on the row matched by type and t
    ours = f"**{a.auc:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})**\\*"
    assert f"| Augmented | 0.90 | 700 | – | {ours} | **0.924 (0.889-0.955)**\\* |" in md
    # paper rows we did not run still appear, with our cells empty
    assert "| Augmented | 0.85 | – | – | – | 0.899 (0.854-0.939) |" in md
    assert "Paper note: The paper gives 1412 augmented samples" in md


def test_paper_tables_are_transcribed_consistently() -> None:
    tables = paper_tables()
    assert list(tables) == ["humerus", "tibia", "femur"]
    aucs = {part: [r.auc.auc for r in t.rows] for part, t in tables.items()}
    assert aucs == {"humerus": [0.876, 0.882, 0.899, 0.924, 0.877],
                    "tibia": [0.618, 0.640, 0.642, 0.698],
                    "femur": [0.533, 0.601, 0.682]}
    starred = {part: [r.key for r in t.rows if r.auc.significant] for part, t in tables.items()}
    assert starred == {"humerus": ["augmented_t0.90"], "tibia": ["tl_g_tl_pl"],
                       "femur": ["tl_g", "tl_g_tl_pl"]}
    samples = {part: [r.augmented_samples for r in t.rows] for part, t in tables.items()}
    assert samples == {"humerus": [0, 1412, None, None, None], "tibia": [0, 124, 118, 1264],
                       "femur": [0, 579, 1342]}
    assert [r.op for r in tables["tibia"].rows] == [0.300, 0.244, 0.290, 0.066]
    for table in tables.values():
        assert table.baseline == "baseline" and table.rows[0].key == "baseline"
        for row in table.rows:
            assert row.auc.ci_low < row.auc.auc < row.auc.ci_high
            # 50:500 test sets: sensitivity is k/50 and specificity k/500
            assert row.sens * 50 == pytest.approx(round(row.sens * 50), abs=1e-9)
            assert row.spec * 500 == pytest.approx(round(row.spec * 500), abs=1e-9)


def test_json_round_trip() -> None:
    table = evaluate_models(_predictions(), baseline="base", config=CONFIG, meta=META,
                            name="humerus", body_part="humerus")
    for t in (table, *paper_tables().values()):
        data = json.loads(json.dumps(to_json(t)))
        assert from_json(data) == t
    with pytest.raises(DataError, match="not a boneaug table"):
        from_json({"schema": "other"})


def _coloured_pixels(png: bytes) -> int:
    """Pixels that are clearly coloured (not white, grey or black): the drawn model curves."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return int((spread > 60).sum())


def test_plot_roc_draws_curves(tmp_path: Path) -> None:
    out = str(tmp_path / "roc.png")
    curves = roc_curves(_predictions())
    plot_roc({k: curves[k] for k in ("aug70", "aug90")}, out, title="two models")
    png = Path(out).read_bytes()
    assert png[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(png))
    assert image.size == (900, 900)  # 6 x 6 in at 150 dpi
    assert _coloured_pixels(png) > 2000
    # a curve of zero length leaves only its legend swatch coloured: the count above is the curves
    plot_roc({"nothing": (np.zeros(2), np.zeros(2), 0.5)}, out, title="no curve")
    assert _coloured_pixels(Path(out).read_bytes()) < 500
    with pytest.raises(DataError, match="no ROC curves"):
        plot_roc({}, out, title="empty")


def _store_run(run: str, *, seed: int = 0) -> None:
    preds = _predictions(seed)
    for key, (val_l, val_s, test_l, test_s) in preds.items():
        ids = [f"v{i:03d}" for i in range(val_l.size)] + [f"t{i:03d}" for i in range(test_l.size)]
        splits = ["val"] * val_l.size + ["test"] * test_l.size
        # store rows in a shuffled order: the reader aligns test images by image_id
        perm = np.random.default_rng(len(key)).permutation(len(ids))
        write_predictions(run, key, META[key],
                          image_ids=[ids[i] for i in perm], splits=[splits[i] for i in perm],
                          labels=np.r_[val_l, test_l][perm], scores=np.r_[val_s, test_s][perm])


def _check_report(run: str) -> None:
    report = storage.join(run, "report")
    png = storage.read_bytes(storage.join(report, "roc_humerus.png"))
    assert png[:8] == PNG_MAGIC and Image.open(io.BytesIO(png)).size == (900, 900)
    assert _coloured_pixels(png) > 2000
    metrics = json.loads(storage.read_bytes(storage.join(report, "metrics.json")))
    assert metrics["schema"] == "boneaug.report/1"
    table = from_json(metrics["tables"][0])
    assert [r.key for r in table.rows] == ["base", "aug70", "aug90"]
    files = storage.read_manifest(report)["files"]
    assert files == ["report.md", "metrics.json", "roc_humerus.png"]


def test_render_report_from_stored_predictions(tmp_path: Path) -> None:
    run = str(tmp_path / "runs" / "r1")
    _store_run(run)
    assert list(read_index(run)) == ["base", "aug70", "aug90"]
    md = render_report_from_predictions(run, CONFIG)
    assert (tmp_path / "runs/r1/report/report.md").read_text() == md
    _check_report(run)
    # the same numbers as evaluating the in-memory predictions directly
    direct = evaluate_models(_predictions(), baseline="base", config=CONFIG, meta=META,
                             name="humerus", body_part="humerus")
    metrics = json.loads((tmp_path / "runs/r1/report/metrics.json").read_text())
    stored = from_json(metrics["tables"][0])
    for key in ("base", "aug70", "aug90"):
        assert stored.row(key).auc.auc == direct.row(key).auc.auc
        assert stored.row(key).op == direct.row(key).op
    a = stored.row("aug90").auc
    assert f"**{a.auc:.3f} ({a.ci_low:.3f}-{a.ci_high:.3f})**\\*" in md
    assert "![ROC curves, " in md and "(roc_humerus.png)" in md
    assert "Side by side with the paper (Paper Table 2: humerus, ablation of t)" in md


def test_render_report_on_s3(s3_bucket: str) -> None:
    run = f"{s3_bucket}/runs/r1"
    _store_run(run)
    md = render_report_from_predictions(run, CONFIG, compare_paper=False)
    assert storage.read_bytes(storage.join(run, "report", "report.md")).decode() == md
    assert "Side by side" not in md
    _check_report(run)


def test_render_report_explains_a_bad_layout(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with pytest.raises(DataError, match="index.json does not exist"):
        render_report_from_predictions(run, CONFIG)
    _store_run(run)
    # a second baseline for the same body part is ambiguous
    val, test = _split_labels((20, 200), (50, 500))
    rng = np.random.default_rng(9)
    write_predictions(
        run, "base2", ModelMeta("Baseline", body_part="humerus", baseline=True),
        image_ids=[f"v{i:03d}" for i in range(val.size)] + [f"t{i:03d}" for i in range(test.size)],
        splits=["val"] * val.size + ["test"] * test.size,
        labels=np.r_[val, test], scores=rng.random(val.size + test.size),
    )
    with pytest.raises(DataError, match="exactly one model with \"baseline\": true"):
        render_report_from_predictions(run, CONFIG)
    # a model scored on other test images cannot be paired
    write_predictions(
        run, "base2", ModelMeta("Other", body_part="humerus"),
        image_ids=[f"v{i:03d}" for i in range(val.size)] + [f"x{i:03d}" for i in range(test.size)],
        splits=["val"] * val.size + ["test"] * test.size,
        labels=np.r_[val, test], scores=rng.random(val.size + test.size),
    )
    with pytest.raises(DataError, match="scored on different test images"):
        render_report_from_predictions(run, CONFIG)
    with pytest.raises(DataError, match="not file-name safe"):
        write_predictions(run, "../evil", ModelMeta("x"), image_ids=["a"], splits=["val"],
                          labels=[1], scores=[0.5])


def test_import_a_classifier_runs_predictions(tmp_path: Path) -> None:
    import pyarrow as pa

    # the layout boneaug.train.classifier writes: float32 scores, int8 labels
    val, test = _split_labels((20, 200), (50, 500))
    rng = np.random.default_rng(10)
    labels = np.r_[val, test]
    source = str(tmp_path / "clf" / "predictions.parquet")
    storage.write_parquet(source, pa.table({
        "image_id": pa.array([f"i{k:04d}" for k in range(labels.size)], pa.string()),
        "split": pa.array(["val"] * val.size + ["test"] * test.size, pa.string()),
        "label": pa.array(labels.astype(np.int8)),
        "score": pa.array((labels + rng.normal(size=labels.size)).astype(np.float32)),
    }))
    run = str(tmp_path / "exp")
    import_predictions(run, "tibia-base", ModelMeta("Baseline", body_part="tibia", baseline=True),
                       source)
    assert read_index(run)["tibia-base"].body_part == "tibia"
    md = render_report_from_predictions(run, CONFIG)
    assert "### tibia: lesion classification on the test set (cf. paper Table 3a)" in md
    assert "Paper Table 3a: tibia" in md and (tmp_path / "exp/report/roc_tibia.png").exists()
