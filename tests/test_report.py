"""eval.report: tables from predictions, markdown in the paper's layout, JSON, the paper's numbers,
ROC figures, and a report re-rendered from stored predictions (local path and S3)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from boneaug import storage
from boneaug.config import EvalConfig
from boneaug.errors import DataError
from boneaug.eval.metrics import bootstrap_auc, operating_point, roc_auc, sens_spec
from boneaug.eval.report import (
    ModelMeta,
    band_aucs,
    band_masks,
    evaluate_models,
    from_json,
    import_predictions,
    paper_tables,
    plot_roc,
    read_conspicuity,
    read_index,
    render_report_from_predictions,
    roc_curves,
    to_json,
    to_markdown,
    write_conspicuity,
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
    assert metrics["schema"] == "boneaug.report/2"
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


# ------------------------------------------------------------------ seeds, arms, curve, bands

ARMS = {  # (type, t) -> (test push, val push by seed); push scales how well a model separates
    ("Copy-paste", 0.70): (1.05, (1.05, 1.05)),
    ("Copy-paste", 0.90): (0.6, (0.6, 0.6)),
    ("Augmented", 0.70): (1.10, (1.10, 1.10)),
    ("Augmented", 0.90): (1.30, (1.30, 1.30)),
    # the oracle: seed 0's validation prefers t = 0.70, seed 1's t = 0.90
    ("Oracle", 0.70): (1.70, (2.5, 1.0)),
    ("Oracle", 0.90): (1.60, (1.0, 2.5)),
}
CURVE = {0.25: (30, 0.55), 0.5: (60, 0.8), 2.0: (240, 1.15)}  # share -> (positives, push)
FULL_POSITIVES = 120
KEYS = {"Copy-paste": "cp", "Augmented": "aug", "Oracle": "oracle"}


class MultiSeed:
    """In-memory predictions of a 2-seed, 3-arm, 2-t humerus experiment with a learning curve,
    and the test set's conspicuity. preds[key] = (val labels, val scores, test labels, scores)."""

    def __init__(self, seeds: tuple[int, ...] = (0, 1), twin: bool = False) -> None:
        rng = np.random.default_rng(42)
        self.val, self.test = _split_labels((20, 200), (50, 500))
        # two test positives below 0.3: that band gets no AUC
        consp = np.r_[0.1, 0.2, rng.uniform(0.3, 1.0, 48)]
        self.conspicuity = np.r_[consp, np.full(500, np.nan)]
        self.test_ids = [f"t{i:03d}" for i in range(self.test.size)]
        self.val_ids = [f"v{i:03d}" for i in range(self.val.size)]
        self.preds: dict[str, tuple[np.ndarray, ...]] = {}
        self.meta: dict[str, ModelMeta] = {}
        for seed in seeds:
            shared_val = rng.normal(size=self.val.size)
            shared_test = rng.normal(size=self.test.size)

            def add(key: str, meta: ModelMeta, push: float, val_push: float,
                    shared_val: np.ndarray = shared_val,
                    shared_test: np.ndarray = shared_test) -> None:
                val = val_push * self.val + shared_val + 0.5 * rng.normal(size=self.val.size)
                gain = np.nan_to_num(self.conspicuity, nan=0.0) + 0.5
                test = (push * self.test * gain + shared_test
                        + 0.5 * rng.normal(size=self.test.size))
                self.preds[key] = (self.val, val, self.test, test)
                self.meta[key] = meta

            add(f"baseline-s{seed}", ModelMeta("Baseline", None, 0, body_part="humerus",
                                               baseline=True, seed=seed,
                                               positives=FULL_POSITIVES), 1.0, 1.0)
            for (type_, t), (push, val_push) in ARMS.items():
                add(f"{KEYS[type_]}-t{t:.2f}-s{seed}",
                    ModelMeta(type_, t, 1000 + 10 * seed + int(100 * t), body_part="humerus",
                              seed=seed, positives=FULL_POSITIVES),
                    push, val_push[seed % 2])
            for share, (positives, push) in CURVE.items():
                add(f"lc-{share:.2f}-s{seed}",
                    ModelMeta("Baseline", None, 0, body_part="humerus", seed=seed,
                              positives=positives, learning_curve=True), push, push)
            if twin:  # the very scores of this seed's baseline
                self.preds[f"twin-s{seed}"] = self.preds[f"baseline-s{seed}"]
                self.meta[f"twin-s{seed}"] = ModelMeta("Twin", body_part="humerus", seed=seed)

    def store(self, run: str, *, conspicuity: bool = True) -> None:
        for key, (val_l, val_s, test_l, test_s) in self.preds.items():
            write_predictions(run, key, self.meta[key], image_ids=self.val_ids + self.test_ids,
                              splits=["val"] * val_l.size + ["test"] * test_l.size,
                              labels=np.r_[val_l, test_l], scores=np.r_[val_s, test_s])
        if conspicuity:
            write_conspicuity(run, self.test_ids, self.conspicuity)

    def seed_keys(self, seed: int) -> dict[str, tuple[np.ndarray, ...]]:
        return {k: v for k, v in self.preds.items() if self.meta[k].seed == seed}


def _render(tmp_path: Path, data: MultiSeed, **kwargs: bool) -> tuple[str, dict, str]:
    run = str(tmp_path / "run")
    data.store(run, **kwargs)
    md = render_report_from_predictions(run, CONFIG, compare_paper=False)
    metrics = json.loads((tmp_path / "run/report/metrics.json").read_text())
    return md, metrics, run


def _arm(metrics: dict, type_: str, t: float | None) -> dict:
    part = metrics["parts"][0]
    return next(a for a in part["arms"] if a["type"] == type_ and a["t"] == t)


def test_two_seeds_aggregate_to_mean_and_sample_sd(tmp_path: Path) -> None:
    data = MultiSeed()
    md, metrics, _ = _render(tmp_path, data)
    assert metrics["parts"][0]["seeds"] == [0, 1]
    assert [t["name"] for t in metrics["tables"]] == ["humerus-s0", "humerus-s1"]
    assert [t["train_seed"] for t in metrics["tables"]] == [0, 1]
    part = metrics["parts"][0]
    assert [(a["type"], a["t"]) for a in part["arms"]] == [("Baseline", None)] + list(ARMS)
    for (type_, t) in [("Baseline", None), *ARMS]:
        arm = _arm(metrics, type_, t)
        keys = [f"baseline-s{s}" if t is None else f"{KEYS[type_]}-t{t:.2f}-s{s}" for s in (0, 1)]
        aucs = [roc_auc(data.preds[k][2], data.preds[k][3]) for k in keys]
        mean, sd = float(np.mean(aucs)), float(np.std(aucs, ddof=1))
        assert arm["keys"] == keys and arm["seeds"] == [0, 1]
        assert arm["auc"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert arm["auc"]["sd"] == pytest.approx(sd, abs=1e-12) and arm["auc"]["n"] == 2
        assert f"{mean:.3f} ± {sd:.3f} (n = 2) |" in md
        if t is not None:
            base = [roc_auc(data.preds[f"baseline-s{s}"][2], data.preds[f"baseline-s{s}"][3])
                    for s in (0, 1)]
            diffs = np.subtract(aucs, base)
            assert arm["diff"]["mean"] == pytest.approx(float(diffs.mean()), abs=1e-12)
            assert arm["diff"]["sd"] == pytest.approx(float(diffs.std(ddof=1)), abs=1e-12)
    # augmented samples differ by seed: the main table shows their mean
    assert "| Oracle | 0.70 | 1075 (mean) |" in md
    # learning-curve models are not rows of the main table, nor of the ROC figure
    assert all(not r["learning_curve"] for a in part["arms"] for r in [a] if "learning_curve" in r)
    assert "lc-0.25" not in md.split("Learning curve:")[0]


def test_each_seed_is_paired_against_its_own_baseline(tmp_path: Path) -> None:
    data = MultiSeed(twin=True)
    md, metrics, _ = _render(tmp_path, data, conspicuity=False)
    twin = _arm(metrics, "Twin", None)
    assert twin["diffs"] == [0.0, 0.0] and twin["n_up"] == twin["n_down"] == 0
    for table in metrics["tables"]:
        row = from_json(table).row(f"twin-s{table['train_seed']}")
        assert (row.auc.diff, row.auc.diff_ci_low, row.auc.diff_ci_high) == (0.0, 0.0, 0.0)
        assert row.auc.baseline == f"baseline-s{table['train_seed']}"
    # the seeds' baselines differ, so pairing across seeds would not give 0
    b0, b1 = (roc_auc(data.preds[f"baseline-s{s}"][2], data.preds[f"baseline-s{s}"][3])
              for s in (0, 1))
    assert abs(b0 - b1) > 1e-3
    zero = "+0.000 (+0.000 to +0.000)"
    assert f"| Twin | – | +0.000 ± 0.000 | {zero} | {zero} | 0/2 |" in md


def test_the_chosen_t_is_the_best_validation_auc_of_each_seed(tmp_path: Path) -> None:
    data = MultiSeed()
    md, metrics, _ = _render(tmp_path, data)
    chosen = {c["type"]: c for c in metrics["parts"][0]["chosen"]}
    assert list(chosen) == ["Copy-paste", "Augmented", "Oracle"]
    for type_, summary in chosen.items():
        for pick, seed in zip(summary["picks"], (0, 1), strict=True):
            val = {t: roc_auc(data.preds[f"{KEYS[type_]}-t{t:.2f}-s{seed}"][0],
                              data.preds[f"{KEYS[type_]}-t{t:.2f}-s{seed}"][1])
                   for (ty, t) in ARMS if ty == type_}
            assert pick["seed"] == seed and pick["t"] == max(val, key=val.get)
            assert pick["val_auc"] == pytest.approx(max(val.values()), abs=1e-12)
            assert pick["key"] == f"{KEYS[type_]}-t{pick['t']:.2f}-s{seed}"
    # the validation sets were built so that the seeds choose different oracle t
    assert [p["t"] for p in chosen["Oracle"]["picks"]] == [0.70, 0.90]
    diffs = [p["auc"]["diff"] for p in chosen["Oracle"]["picks"]]
    assert chosen["Oracle"]["diff"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert chosen["Oracle"]["diff"]["sd"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
    assert chosen["Oracle"]["n_up"] == 2 and chosen["Oracle"]["n_gain"] == 2
    row = next(line for line in md.splitlines() if line.startswith("| Oracle | t = 0.70 (val"))
    assert "| t = 0.90 (val" in row and row.endswith("| 2/2 | 2/2 |")
    assert "| CI > 0 | CI > 0 and ΔAUC ≥ +0.030 |" in md


def test_significant_seeds_are_counted_up_and_down(tmp_path: Path) -> None:
    data = MultiSeed()
    md, metrics, _ = _render(tmp_path, data, conspicuity=False)
    for (type_, t) in ARMS:
        arm = _arm(metrics, type_, t)
        up = down = 0
        for seed in (0, 1):
            preds = data.seed_keys(seed)
            res = bootstrap_auc(data.test, {k: v[3] for k, v in preds.items()}, n_replicates=400,
                                seed=0, baseline=f"baseline-s{seed}")[arm["keys"][seed]]
            up += res.diff_ci_low > 0
            down += res.diff_ci_high < 0
        assert (arm["n_up"], arm["n_down"]) == (up, down)
    assert (_arm(metrics, "Oracle", 0.70)["n_up"], _arm(metrics, "Copy-paste", 0.90)["n_down"]) \
        == (2, 2)
    diff_rows = md.split("Paired AUC difference against each training seed's own baseline")[1]
    assert "| 2/2 down |" in diff_rows and "| 2/2 up |" in diff_rows


def test_learning_curve_table_and_figure(tmp_path: Path) -> None:
    data = MultiSeed()
    md, metrics, run = _render(tmp_path, data, conspicuity=False)
    curve = metrics["parts"][0]["learning_curve"]
    assert [p["positives"] for p in curve] == [30, 60, 120, 240]
    assert [p["share"] for p in curve] == [0.25, 0.5, 1.0, 2.0]
    for point in curve:
        keys = point["keys"]
        aucs = [roc_auc(data.preds[k][2], data.preds[k][3]) for k in keys]
        assert point["seeds"] == [0, 1] and point["aucs"] == pytest.approx(aucs, abs=1e-12)
        assert point["auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
    assert curve[2]["keys"] == ["baseline-s0", "baseline-s1"]  # the 100 % point
    rows = [line for line in md.splitlines() if re.match(r"^\| \d+ \| \d+ % \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [30, 60, 120, 240]
    assert rows[0].startswith("| 30 | 25 % | ")
    png = (tmp_path / "run/report/learning_curve_humerus.png").read_bytes()
    assert png[:8] == PNG_MAGIC and Image.open(io.BytesIO(png)).size == (1050, 675)
    assert _coloured_pixels(png) > 500  # seed dots and the arms' dashed lines
    assert "![Learning curve, humerus](learning_curve_humerus.png)" in md
    files = storage.read_manifest(storage.join(run, "report"))["files"]
    assert files == ["report.md", "metrics.json", "roc_humerus.png", "learning_curve_humerus.png"]


def test_band_aucs_are_the_auc_of_the_band_subset(tmp_path: Path) -> None:
    data = MultiSeed()
    md, metrics, run = _render(tmp_path, data)
    assert read_conspicuity(run)["t000"] == pytest.approx(0.1, abs=1e-6)
    assert np.isnan(read_conspicuity(run)["t100"])
    bands = metrics["parts"][0]["bands"]
    c = np.nan_to_num(data.conspicuity.astype(np.float32).astype(np.float64), nan=-1.0)
    pos = data.test == 1
    masks = [pos & (c >= 0) & (c < 0.3), pos & (c >= 0.3) & (c < 0.5),
             pos & (c >= 0.5) & (c < 0.7), pos & (c >= 0.7) & (c <= 1.0), pos]
    assert bands["n_pos"] == [int(m.sum()) for m in masks] and bands["n_pos"][0] == 2
    assert bands["n_neg"] == 500 and bands["n_unbanded"] == 0
    chosen = {ch["type"]: ch for ch in metrics["parts"][0]["chosen"]}
    assert [r["type"] for r in bands["rows"]] == ["Baseline", "Copy-paste", "Augmented", "Oracle"]
    for row in bands["rows"]:
        if row["type"] != "Baseline":
            assert row["keys"] == [p["key"] for p in chosen[row["type"]]["picks"]]
        per_seed = []
        for key, aucs in zip(row["keys"], row["aucs"], strict=True):
            scores = data.preds[key][3]
            expected = [roc_auc(data.test[m | ~pos], scores[m | ~pos]) for m in masks[1:]]
            assert aucs[0] is None  # 2 positives: fewer than 3
            assert aucs[1:] == pytest.approx(expected, abs=1e-12)
            per_seed.append(expected)
        assert row["mean"][0] is None
        assert row["mean"][1:] == pytest.approx(np.mean(per_seed, axis=0).tolist(), abs=1e-12)
    header = next(line for line in md.splitlines() if line.startswith("| Type | t | [0, 0.3)"))
    assert f"[0, 0.3) (n = 2) | [0.3, 0.5) (n = {bands['n_pos'][1]})" in header
    assert header.endswith(f"| [0.7, 1.0] (n = {bands['n_pos'][3]}) | all (n = 50) |")
    oracle = next(line for line in md.splitlines() if line.startswith("| Oracle | 0.70, 0.90"))
    assert oracle.split(" | ")[2] == "–"


def test_band_helpers_and_conspicuity_checks(tmp_path: Path) -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    consp = np.array([0.3, 0.5, 0.7, 1.0, np.nan, np.nan, np.nan])
    masks = band_masks(labels, consp)
    # edges: [lo, hi) except the last band, which holds 1.0
    assert [m.nonzero()[0].tolist() for m in masks] == [[], [0], [1], [2, 3]]
    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.5, 0.6])
    assert band_aucs(labels, scores, [labels == 1], min_positives=3) == (
        roc_auc(labels, scores),)
    assert band_aucs(labels, scores, masks[3:], min_positives=3) == (None,)
    with pytest.raises(DataError, match=r"conspicuity must lie in \[0, 1\].*'b' has 1.5"):
        write_conspicuity(str(tmp_path), ["a", "b"], [0.2, 1.5])
    with pytest.raises(DataError, match="image_id repeats"):
        write_conspicuity(str(tmp_path), ["a", "a"], [0.2, None])


def test_an_old_index_without_seeds_still_renders(tmp_path: Path) -> None:
    run = str(tmp_path / "old")
    _store_run(run)
    index_path = tmp_path / "old/predictions/index.json"
    index = json.loads(index_path.read_text())
    for entry in index["models"].values():
        for name in ("seed", "positives", "learning_curve", "train_losses", "val_aucs",
                     "kept_epoch"):
            del entry[name]
    index_path.write_text(json.dumps(index))
    assert read_index(run)["aug90"] == META["aug90"]
    md = render_report_from_predictions(run, CONFIG)
    metrics = json.loads((tmp_path / "old/report/metrics.json").read_text())
    table = from_json(metrics["tables"][0])
    assert table.name == "humerus" and table.train_seed == 0
    assert metrics["parts"][0]["learning_curve"] == [] and metrics["parts"][0]["bands"] is None
    assert "Learning curve" not in md and "conspicuity" not in md
    assert "fine-tuning" not in md and "Spearman" not in md  # one seed, no history stored
    assert "AUC mean ± sd (n seeds)" not in md  # one seed: the paper's layout, as before
    assert "| Augmented | t = 0.90 (val " in md  # two t: the validation choice is shown
    # a metrics.json table written before the new fields still loads
    old_row = dict(metrics["tables"][0]["rows"][0])
    for name in ("val_auc", "positives", "learning_curve"):
        del old_row[name]
    old = {**metrics["tables"][0], "rows": [old_row]}
    del old["train_seed"]
    assert from_json(old).rows[0].val_auc is None


def test_a_second_baseline_for_a_seed_names_both(tmp_path: Path) -> None:
    data = MultiSeed(seeds=(0, 1))
    data.meta["cp-t0.70-s1"] = dataclasses.replace(data.meta["cp-t0.70-s1"], baseline=True)
    run = str(tmp_path / "run")
    data.store(run, conspicuity=False)
    with pytest.raises(DataError, match="'humerus', training seed 1: needs exactly one model "
                                        "with \"baseline\": true in the prediction index, found "
                                        "'baseline-s1', 'cp-t0.70-s1'"):
        render_report_from_predictions(run, CONFIG)
    # a seed without a baseline cannot be paired either
    data.meta["cp-t0.70-s1"] = dataclasses.replace(data.meta["cp-t0.70-s1"], baseline=False)
    data.meta["baseline-s1"] = dataclasses.replace(data.meta["baseline-s1"], baseline=False)
    data.store(run, conspicuity=False)
    with pytest.raises(DataError, match="training seed 1: needs exactly one .* found none"):
        render_report_from_predictions(run, CONFIG)


def test_the_baselines_fine_tuning_and_their_agreement_between_seeds(tmp_path: Path) -> None:
    data = MultiSeed()
    data.meta["baseline-s0"] = dataclasses.replace(  # kept the best epoch, the second of three
        data.meta["baseline-s0"], train_losses=(0.8, 0.6, 0.5), val_aucs=(0.6, 0.7, 0.65),
        kept_epoch=1)
    md, metrics, run = _render(tmp_path, data)  # seed 1's baseline has no history stored
    training = metrics["parts"][0]["training"]
    assert [r["seed"] for r in training["seeds"]] == [0]
    row = training["seeds"][0]
    assert (row["epochs"], row["kept_epoch"]) == (3, 2)
    assert row["loss_fall"] == pytest.approx(0.25) and row["val_rise"] == pytest.approx(0.1)
    assert "| 0 | 3 | 2 | 0.800 -> 0.600 (25 %) | 0.600 -> 0.700 (+0.100) |" in md
    rho = spearmanr(data.preds["baseline-s0"][3], data.preds["baseline-s1"][3]).statistic
    assert training["agreement"] == [{"seed_a": 0, "seed_b": 1, "spearman": pytest.approx(rho)}]
    assert f"seeds 0 and 1: {rho:.2f}." in md
    assert read_index(run)["baseline-s0"].train_losses == (0.8, 0.6, 0.5)  # stored, read back
