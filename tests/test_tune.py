"""Ray Tune sweeps (boneaug.tune): spaces and config mapping, resources, the three smoke sweeps on a
real Ray with real MLflow (nested trial runs, metrics), best.yaml read back by the jobs' loader,
and a sweep interrupted by a failing trial that resumes with Tuner.restore."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faults
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray.tune

from boneaug import storage
from boneaug.augment.pipeline import select_augmented
from boneaug.config import BoneaugConfig, ComputeConfig, load_config
from boneaug.data.datasets import image_table
from boneaug.errors import ConfigError
from boneaug.eval.quality import CriticConfig
from boneaug.runtime import job_parser, setup
from boneaug.tune import (
    Param,
    QualityWatcher,
    SweepIncomplete,
    SweepSettings,
    apply_params,
    child_runs,
    choose_best,
    max_concurrent,
    patches_space,
    prepare_patches,
    quality_objective,
    render_table,
    run_reporting,
    run_sweep,
    threshold_space,
    trial_resources,
    unit_space,
)

BODY_PART = "humerus"
# smoke sizes, then less: one DRN epoch (the loop runs epochs 1..epochs-1), two UNIT iterations
# with a quality report after each (so ASHA sees two results), a quarter CPU per Train worker so
# that three trials fit on the session's 2 logical CPUs with one CPU left for Ray Data.
OVERRIDES = {
    "drn": {"epochs": 2},
    "unit": {"iterations": 2, "checkpoint_every": 1, "sample_every": 1, "log_every": 1},
    "compute": {"num_workers": 1, "cpus_per_worker": 0.25, "max_failures": 0},
}
CRITIC = CriticConfig(steps=20, batch_size=8, seed=0)  # the quality probe's critic, cheap


# ---- pure parts ----------------------------------------------------------------------------
def test_apply_params_puts_each_sweeps_values_where_the_steps_read_them(
    smoke_config: BoneaugConfig
) -> None:
    tuned = apply_params(smoke_config, "threshold", "tibia", {"t": 0.85})
    assert tuned.augment.thresholds == (0.85,) and tuned.augment.t["tibia"] == 0.85
    assert tuned.augment.t["humerus"] == smoke_config.augment.t["humerus"]

    tuned = apply_params(smoke_config, "patches", "femur", {"s": 1.0, "n": np.int64(5)})
    assert (tuned.patches.body_parts["femur"].s, tuned.patches.body_parts["femur"].n) == (1.0, 5)
    assert tuned.patches.body_parts["humerus"] == smoke_config.patches.body_parts["humerus"]

    tuned = apply_params(smoke_config, "unit", "humerus", {"lambda_gan": 1.5, "lr": 3e-4})
    assert ((tuned.unit.lambda_gan, tuned.unit.lr, tuned.unit.lambda_cyc)
            == (1.5, 3e-4, smoke_config.unit.lambda_cyc))

    with pytest.raises(ConfigError, match="has no parameter"):
        apply_params(smoke_config, "unit", "humerus", {"t": 0.9})
    with pytest.raises(ConfigError, match="invalid config"):
        apply_params(smoke_config, "patches", "humerus", {"s": 0.5})


def test_spaces_cover_the_paper_values_and_refuse_bad_ranges(smoke_config: BoneaugConfig) -> None:
    assert (threshold_space([0.95, 0.7, 0.9, 0.85, 0.9])["t"]
            == Param("grid", (0.7, 0.85, 0.9, 0.95)))
    space = patches_space((2, 1), (7, 10))
    assert space["s"].values == (1.0, 2.0) and space["n"] == Param("randint", (7, 10))
    unit = unit_space(smoke_config.unit, factor=10)
    assert unit["lambda_gan"].values == pytest.approx((1.0, 100.0))  # lambda0 = 10
    assert unit["lambda_kl"].values == pytest.approx((0.01, 1.0))  # lambda1 = 0.1
    assert unit["lr"].values == pytest.approx((1e-5, 1e-3))
    no_kl = smoke_config.unit.model_copy(update={"lambda_kl": 0.0})
    assert "lambda_kl" not in unit_space(no_kl)  # a switched-off term stays off
    for bad in (lambda: threshold_space([1.2]), lambda: patches_space((0.5,)),
                lambda: Param("loguniform", (0.0, 1.0)),
                lambda: unit_space(smoke_config.unit, factor=0.5)):
        with pytest.raises(ConfigError):
            bad()


def test_concurrency_leaves_a_cpu_for_ray_data_and_respects_gpus_and_driver_slots() -> None:
    smoke = ComputeConfig(num_workers=1, cpus_per_worker=0.5)
    # two would hold 1.02 CPUs and starve Ray Data's tasks
    assert max_concurrent(smoke, {"CPU": 2}) == 1
    assert max_concurrent(ComputeConfig(num_workers=1, cpus_per_worker=0.25), {"CPU": 2}) == 3
    assert max_concurrent(ComputeConfig(num_workers=2, cpus_per_worker=1), {"CPU": 16}) == 7
    assert max_concurrent(ComputeConfig(num_workers=4, use_gpu=True), {"CPU": 64, "GPU": 8}) == 2
    assert max_concurrent(ComputeConfig(num_workers=1, use_gpu=True),
                          {"CPU": 64, "GPU": 6, "tune_driver": 4}) == 4
    assert max_concurrent(smoke, {"CPU": 1}) == 1  # always at least one
    assert trial_resources({"CPU": 8}) == {"CPU": 0.01}
    assert trial_resources({"CPU": 8, "tune_driver": 4}) == {"CPU": 0.01, "tune_driver": 1.0}


def test_objective_penalises_translations_unlike_any_real_patch() -> None:
    assert quality_objective(0.4, None) == 0.4
    # closer to real lesions than healthy patches are: no penalty
    assert quality_objective(0.4, 0.7) == 0.4
    assert quality_objective(0.9, 3.0) == pytest.approx(-1.1)  # "lesion" noise loses what it gained


def test_best_is_the_highest_finished_trial_and_the_table_marks_it() -> None:
    rows = [
        {"trial_id": "a", "t": 0.7, "augmented_samples": 9, "val_auc": 0.81, "test_auc": 0.7,
         "status": "done"},
        {"trial_id": "b", "t": 0.9, "augmented_samples": 4, "val_auc": 0.88, "test_auc": 0.6,
         "status": "done"},
        {"trial_id": "c", "t": 0.95, "augmented_samples": 1, "val_auc": 0.99,
         "status": "stopped early"},
        {"trial_id": "d", "t": 0.85, "val_auc": math.nan, "status": "done"},
    ]
    assert choose_best(rows, "val_auc")["trial_id"] == "b"
    table = render_table("threshold", rows)
    assert "| b | 0.900 | 4 | 0.880 | 0.600 | done | **yes** |" in table
    with pytest.raises(SweepIncomplete):
        choose_best(rows[2:3], "val_auc")


def test_run_reporting_forwards_progress_while_fit_runs_and_reraises_its_error() -> None:
    seen: list[dict] = []
    progress = iter([[], [{"iteration": 1}], [{"iteration": 2}], []])

    def fit() -> str:
        time.sleep(0.3)
        return "done"

    assert run_reporting(fit, lambda: next(progress, []), seen.append, every_s=0.05) == "done"
    assert [r["iteration"] for r in seen] == [1, 2]

    def boom() -> None:
        raise ValueError("worker died")

    with pytest.raises(ValueError, match="worker died"):
        run_reporting(boom, lambda: [], seen.append, every_s=0.05)


def test_quality_watcher_reads_each_new_step_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("watch",
                                                     artifact_location=str(tmp_path / "a")))
    run_id = run.info.run_id

    def log(step: int, translated: float, fd: float) -> None:
        values = {"frac_source": 0.2, "frac_translated": translated, "gain": translated - 0.2,
                  "fd_ratio": fd}
        client.log_batch(run_id, metrics=[Metric(f"quality/{k}", v, 0, step)
                                          for k, v in values.items()])

    watcher = QualityWatcher(client, run_id, final_iteration=3)
    assert watcher.new() == []
    log(1, 0.9, 2.5)
    log(2, 0.6, 0.8)
    got = watcher.new()
    assert [g["iteration"] for g in got] == [1, 2]
    assert (got[0]["objective"] == pytest.approx(0.7 - 1.5)
            and got[1]["objective"] == pytest.approx(0.4))
    log(3, 0.5, 0.5)  # the final iteration: the trial's own final report carries it
    assert watcher.new() == []


# ---- the sweeps on Ray ---------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    config: BoneaugConfig
    data: str
    run: str
    root: Path
    inputs: dict


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Iterator[Prepared]:
    """A synthetic smoke cohort, ingested, with base patch sets; MLflow in a sqlite file here."""
    root = tmp_path_factory.mktemp("tune")
    db = f"sqlite:///{root / 'mlflow.db'}"
    config = load_config("smoke", overrides={**OVERRIDES, "tracking": {"tracking_uri": db}})
    data, run = str(root / "data"), str(root / "out" / "runs" / f"{BODY_PART}-smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands here, not in the repo
        start = time.perf_counter()
        inputs = prepare_patches(config, BODY_PART, data_uri=data, run_uri=run, synthesize=True)
        print(f"prepared cohort, ingest and patches in {time.perf_counter() - start:.0f} s")
        yield Prepared(config, data, run, root, inputs)


def _stand_in_candidates(run: str, out: str) -> str:
    """Candidates as blend_and_score writes them (the columns select_augmented and training read),
    cut from real training negatives relabelled as lesions, with spread scores. A stand-in for the
    blend (tested in test_blend.py) so that this test trains no UNIT and no scorer."""
    table = image_table(run)
    table = table.filter(pc.and_(pc.equal(table.column("split"), "train"),
                                 pc.equal(table.column("label"), 0))).slice(0, 8)
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id",
                             pa.array([f"aug-{i:03d}" for i in range(n)]))
    table = table.set_column(table.schema.get_field_index("label"), "label",
                             pa.array(np.ones(n, np.int8)))
    table = table.append_column("score", pa.array(np.linspace(0.1, 0.95, n).astype(np.float32)))
    uri = storage.join(out, "candidates")
    storage.write_parquet(storage.join(uri, "part-0.parquet"),
                          table.select([c for c in table.column_names if c != "confounders"]))
    return uri


def _training_actors() -> dict[str, str]:
    """{id: what} of the live Ray Train / Tune actors and of the placement groups still
    reserving resources (GCS views)."""
    from ray._private.state import actors
    from ray.util import placement_group_table

    live = {aid: a["ActorClassName"] for aid, a in actors().items() if a["State"] == "ALIVE"
            and a["ActorClassName"] in ("TrainController", "RayTrainWorker", "run_trial")}
    return live | {pid: f"placement group {p['bundles']}"
                   for pid, p in placement_group_table().items() if p["state"] != "REMOVED"}


def _assert_no_training_left(before: dict[str, str], timeout_s: float = 60.0) -> None:
    """Every trial's Ray Train run is gone, those ASHA stopped included: their controller and
    workers die with the trial's process, and Train's cleaner frees their reservations (a leak
    here once starved a later test). What was alive `before` the sweep belongs to earlier tests
    of the session's shared Ray and is not the sweep's."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = sorted(what for key, what in _training_actors().items() if key not in before)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert alive == [], f"left running after the sweep: {alive}"


def _assert_statuses(children: list, rows: list[dict]) -> None:
    """Finished trials' runs are FINISHED; those ASHA stopped are KILLED and tagged so."""
    status = {r["mlflow_run_id"]: r["status"] for r in rows}
    for child in children:
        stopped = status[child.info.run_id] == "stopped early"
        assert child.info.status == ("KILLED" if stopped else "FINISHED")
        assert (child.data.tags.get("boneaug.stopped_by") == "ASHA") == stopped


def _children(parent_run_id: str, config: BoneaugConfig) -> list:
    return child_runs(parent_run_id, tracking_config=config.tracking)


def _loads_as_a_job_config(best_uri: str, tmp: Path) -> BoneaugConfig:
    """best.yaml read back the way every job reads --config (runtime.setup)."""
    local = tmp / "best.yaml"
    local.write_bytes(storage.read_bytes(best_uri))
    args = job_parser("test").parse_args(["--body-part", BODY_PART, "--config", str(local),
                                          "--data", str(tmp)])
    config, _, _ = setup(args)
    return config


@pytest.fixture
def sweep_env(prepared: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep as a job runs it: the prepared run's MLflow store in the environment, its root as
    cwd."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", prepared.config.tracking.tracking_uri)
    monkeypatch.chdir(prepared.root)


@pytest.mark.slow
def test_threshold_sweep_resumes_after_an_interruption_and_writes_a_loadable_best_config(
    prepared: Prepared, tmp_path: Path, sweep_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    candidates = _stand_in_candidates(prepared.run, str(tmp_path / "augmented"))
    grid = (0.3, 0.8)
    settings = SweepSettings(kind="threshold", body_part=BODY_PART, space=threshold_space(grid),
                             verbose=0)
    inputs = {"candidates": candidates, "init_from": None}
    faults.by_value()  # the t = 0.8 trial fails once, where run_sweep hands its trainable to Tune
    with_parameters = ray.tune.with_parameters
    monkeypatch.setattr(ray.tune, "with_parameters", lambda trainable, **kw: with_parameters(
        faults.trial_fails_once(trainable, when={"t": 0.8}, marker=str(tmp_path / "failed-once")),
        **kw))

    start = time.perf_counter()
    # the t = 0.8 trial fails: interrupted
    with pytest.raises(SweepIncomplete, match="1 of 2 trials"):
        run_sweep(prepared.config, settings, data_uri=prepared.data, run_uri=prepared.run,
                  inputs=inputs)
    first = time.perf_counter() - start
    sweep_dirs = list((Path(prepared.run) / "tune").glob("threshold-*"))
    assert len(sweep_dirs) == 1
    partial = json.loads((sweep_dirs[0] / "results.json").read_text())
    done = {r["t"]: r for r in partial if r["status"] == "done"}
    assert set(done) == {0.3} and [r["status"] for r in partial if r["t"] == 0.8] == ["error"]
    manifest = next(sweep_dirs[0].glob("trials/*/drn/_MANIFEST.json"))
    finished_before = manifest.read_bytes()

    start = time.perf_counter()
    result = run_sweep(prepared.config, settings, data_uri=prepared.data, run_uri=prepared.run,
                       inputs=inputs)  # the same call again: Tuner.restore
    print(f"threshold sweep: {first:.0f} s to the failure, "
          f"{time.perf_counter() - start:.0f} s to resume")
    assert result.resumed and result.sweep_uri == str(sweep_dirs[0])
    assert manifest.read_bytes() == finished_before  # the finished trial was kept, not retrained
    rows = {r["t"]: r for r in result.rows}
    assert set(rows) == set(grid) and all(r["status"] == "done" for r in rows.values())
    for t in grid:  # augmented samples = what the threshold keeps of the candidates
        assert rows[t]["augmented_samples"] == select_augmented(candidates, t).num_rows
        assert 0 <= rows[t]["val_auc"] <= 1 and 0 <= rows[t]["test_auc"] <= 1
    assert rows[0.3]["augmented_samples"] > rows[0.8]["augmented_samples"] > 0
    best_t = max(grid, key=lambda t: (rows[t]["val_auc"], -grid.index(t)))
    assert result.best["t"] == best_t and "**yes**" in result.markdown

    children = _children(result.parent_run_id, prepared.config)
    assert len(children) == 2  # the resumed trial reused its nested run
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_auc", "best_val_auc", "tune/val_auc", "tune/test_auc",
                "tune/augmented_samples"} <= set(child.data.metrics)
        assert float(child.data.params["tune.t"]) in grid and "drn.lr" in child.data.params
    from mlflow import MlflowClient

    parent_run = MlflowClient(tracking_uri=prepared.config.tracking.tracking_uri).get_run(
        result.parent_run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics["best/val_auc"] == pytest.approx(rows[best_t]["val_auc"])

    loaded = _loads_as_a_job_config(result.best_config_uri, tmp_path)
    assert loaded.augment.thresholds == (best_t,) and loaded.augment.t[BODY_PART] == best_t
    assert loaded.drn == prepared.config.drn and loaded.profile == "smoke"


@pytest.mark.slow
def test_patch_sweep_remakes_patches_per_trial_and_reports_quality_to_asha(
    prepared: Prepared, tmp_path: Path, sweep_env: None
) -> None:
    settings = SweepSettings(kind="patches", body_part=BODY_PART,
                             space=patches_space((1.0, 2.0), (2, 3)),
                             search="random", scheduler="asha", asha_grace=1, verbose=0)
    start = time.perf_counter()
    before = _training_actors()
    result = run_sweep(prepared.config, settings, data_uri=prepared.data, run_uri=prepared.run,
                       inputs=prepared.inputs, critic=CRITIC)
    print(f"patch sweep: {time.perf_counter() - start:.0f} s")
    _assert_no_training_left(before)
    assert (sorted(r["s"] for r in result.rows) == [1.0, 2.0]
            and all(r["n"] in (2, 3) for r in result.rows))
    assert any(r["status"] == "done" for r in result.rows)
    for row in result.rows:
        made = storage.read_manifest(storage.join(result.sweep_uri, "trials", row["trial_id"],
                                                  "patches"))
        assert (made is not None and made["settings"]["s"] == row["s"]
                and made["settings"]["n"] == row["n"])
        assert math.isfinite(row["objective"]) and 0 <= row["frac_translated"] <= 1
        reported = [json.loads(line) for line in
                    (Path(result.sweep_uri) / row["trial_id"] / "result.json")
                    .read_text().splitlines()]
        assert ([r["iteration"] for r in reported][: 1 + (row["status"] == "done")]
                == [1, 2][: 1 + (row["status"] == "done")])
    children = _children(result.parent_run_id, prepared.config)
    assert len(children) == 2
    _assert_statuses(children, result.rows)
    for child in children:
        assert "quality/frac_translated" in child.data.metrics and "tune.s" in child.data.params
    best = result.best
    loaded = _loads_as_a_job_config(result.best_config_uri, tmp_path)
    assert ((loaded.patches.body_parts[BODY_PART].s, loaded.patches.body_parts[BODY_PART].n)
            == (best["s"], best["n"]))


@pytest.mark.slow
def test_unit_sweep_samples_loss_weights_with_optuna_and_writes_them_to_best_yaml(
    prepared: Prepared, tmp_path: Path, sweep_env: None
) -> None:
    space = unit_space(prepared.config.unit, factor=10.0, lr_factor=10.0)
    settings = SweepSettings(kind="unit", body_part=BODY_PART, space=space, num_samples=2,
                             search="optuna", scheduler="asha", asha_grace=1, seed=3, verbose=0)
    start = time.perf_counter()
    before = _training_actors()
    result = run_sweep(prepared.config, settings, data_uri=prepared.data, run_uri=prepared.run,
                       inputs=prepared.inputs, critic=CRITIC)
    print(f"UNIT sweep: {time.perf_counter() - start:.0f} s")
    _assert_no_training_left(before)
    assert len(result.rows) == 2
    for row in result.rows:
        for name, param in space.items():
            low, high = param.values
            assert low <= row[name] <= high
        assert math.isfinite(row["objective"])
    assert result.rows[0]["lambda_gan"] != result.rows[1]["lambda_gan"]  # two different draws
    children = _children(result.parent_run_id, prepared.config)
    assert ({c.data.tags["boneaug.trial_id"] for c in children}
            == {r["trial_id"] for r in result.rows})
    _assert_statuses(children, result.rows)
    for child in children:
        assert "quality/gain" in child.data.metrics and "unit.lambda_gan" in child.data.params
    loaded = _loads_as_a_job_config(result.best_config_uri, tmp_path)
    for name in space:
        assert getattr(loaded.unit, name) == pytest.approx(result.best[name])
    assert loaded.patches == prepared.config.patches and loaded.unit.iterations == 2
