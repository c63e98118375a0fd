from __future__ import annotations

from pathlib import Path

import pytest

from boneaug import workflow
from boneaug.workflow import stage


def test_stage_reuses_results_for_the_same_inputs_and_reruns_on_change(tmp_path: Path) -> None:
    calls: list[int] = []

    def work() -> dict[str, int]:
        calls.append(1)
        return {"value": len(calls)}

    def value(inputs: object, name: str = "step") -> int:
        return stage(run, name, inputs, work)["value"]

    run = str(tmp_path / "run")
    assert value({"lr": 1e-4}) == 1
    assert value({"lr": 1e-4}) == 1  # reused, not recomputed
    assert len(calls) == 1
    assert value({"lr": 2e-4}) == 2  # inputs changed: recomputed
    assert value({"lr": 2e-4}, "other") == 3  # stages are independent


def test_a_reused_stage_is_announced_once_per_process_and_a_stage_made_here_never(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # later stages read the patches, the UNIT and the baselines again: the demo printed
    # "[patches] reused" twice for a stage it had just made
    monkeypatch.setattr(workflow, "_KNOWN", set())
    run = str(tmp_path / "run")
    for _ in range(3):
        stage(run, "patches", 1, lambda: {"n": 1})
    printed = capsys.readouterr().out
    assert printed.count("[patches] running") == 1 and "reused" not in printed

    monkeypatch.setattr(workflow, "_KNOWN", set())  # a later process, e.g. a rerun of the job
    for _ in range(3):
        stage(run, "patches", 1, lambda: {"n": 2})
    printed = capsys.readouterr().out
    assert printed.count("[patches] reused") == 1 and "running" not in printed


def test_a_stage_reruns_when_a_stage_it_reads_was_remade_with_the_same_looking_result(
    tmp_path: Path,
) -> None:
    # a re-blend after a new translator writes as many candidates to the same place: the scores
    # read from it must be remade, not reused
    run = str(tmp_path / "run")
    scored: list[dict] = []

    def blend(translator: str) -> dict:
        return stage(run, "blend", [translator], lambda: {"uri": "blended", "count": 455})

    def score(blended: dict) -> dict:
        return stage(run, "score", [blended], lambda: scored.append(blended) or {"n": len(scored)})

    first = blend("unit/1")
    assert score(first)["n"] == 1 and score(blend("unit/1"))["n"] == 1  # reused downstream
    second = blend("unit/2")
    assert (second["uri"], second["count"]) == (first["uri"], first["count"])
    assert score(second)["n"] == 2  # remade


def test_a_failed_stage_records_nothing(tmp_path: Path) -> None:
    run = str(tmp_path / "run")

    def boom() -> dict[str, int]:
        raise RuntimeError("worker died")

    try:
        stage(run, "step", 1, boom)
    except RuntimeError:
        pass
    assert not (tmp_path / "run" / "stages" / "step.json").exists()
    assert stage(run, "step", 1, lambda: {"ok": 1})["ok"] == 1


def test_reproduce_runs_the_body_parts_asked_and_says_why_tibia_needs_humerus() -> None:
    import importlib.util


    path = Path(__file__).resolve().parents[1] / "jobs" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce_job", path)
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.parse_body_parts(None) == ("humerus", "tibia", "femur")
    assert job.parse_body_parts("femur, humerus") == ("humerus", "femur")
    with pytest.raises(SystemExit, match="humerus must be among them"):
        job.parse_body_parts("tibia")
    with pytest.raises(SystemExit, match="unknown radius; choose from humerus, tibia, femur"):
        job.parse_body_parts("humerus,radius")
    # Table 3's arms at the t humerus chose for their counterparts (augment.t_from_humerus)
    tibia = dict(job.EXPERIMENTS)["tibia"]
    chosen = {"aug": 0.70, "copy_paste": 0.90, "oracle": 0.85}
    assert job.humerus_grids(tibia, chosen) == {
        "aug": (0.70,), "tl_g": (0.70,), "tl_g_pl": (0.70,), "copy_paste": (0.90,),
        "oracle": (0.85,)}
    assert job.humerus_grids(tibia, {}) == {}  # humerus itself searches the grid


def test_an_arm_at_a_t_that_keeps_no_candidate_is_the_seeds_baseline_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from boneaug.config import load_config
    from boneaug.eval.report import read_predictions
    from boneaug.workflow import ARMS, _Arm, _arm_trainings, _collect_arms

    (tmp_path / "candidates").mkdir()
    pq.write_table(pa.table({"image_id": ["b", "a"], "score": [0.40, 0.65]}),
                   tmp_path / "candidates" / "part-0.parquet")
    pq.write_table(pa.table({"image_id": ["x", "y", "z"], "split": ["val", "test", "test"],
                             "label": [1, 0, 1], "score": [0.9, 0.2, 0.7]}),
                   tmp_path / "baseline.parquet")
    baseline = {"model": "models:/boneaug-drn-femur/4", "version": "4", "val_auc": 0.69,
                "predictions": str(tmp_path / "baseline.parquet")}
    run = str(tmp_path / "run")
    arm = _Arm(ARMS["oracle"], 2, {}, {"candidates": str(tmp_path / "candidates")}, baseline)
    assert _arm_trainings(load_config("smoke"), run, "femur", "models:/boneaug-drn-fracture/1",
                          arm.variant, arm.seed, arm.candidates, (0.70, 0.90), False) == []
    [arm] = _collect_arms(run, "femur", [(arm, (0.70, 0.90))], {}, False)

    assert arm.trained == {0.70: baseline | {"samples": 0}, 0.90: baseline | {"samples": 0}}
    assert "[drn-oracle-t0.90-s2] no candidate scores >= 0.90: the arm is baseline-s2" in \
        capsys.readouterr().out
    ids, labels, scores = read_predictions(run, "oracle-t0.70-s2")["test"]
    assert list(ids) == ["y", "z"] and list(scores) == pytest.approx([0.2, 0.7])


def _sleeper(name: str, seconds: float) -> object:
    """A Training that sleeps in its Ray task and says where, when and with what config."""
    from boneaug.workflow import Training

    def train(config: object) -> dict:
        import os
        import time

        from boneaug import tracking

        start = time.time()
        with tracking.start_run("side-by-side", name, tracking=config.tracking):  # type: ignore[attr-defined]
            time.sleep(seconds)
        return {"pid": os.getpid(), "threads": config.compute.torch_threads,  # type: ignore[attr-defined]
                "start": start, "end": time.time()}

    return Training(name, [name, seconds], train)


def test_independent_trainings_train_side_by_side_in_ray_tasks_then_are_reused(
    ray_session: None, tmp_path: Path
) -> None:
    import os

    from boneaug.config import load_config
    from boneaug.workflow import train_stages

    # a fresh sqlite store: two processes creating its tables at once fail, so the driver
    # opens it before the trainings log to it
    db = tmp_path / "mlflow.db"
    config = load_config("smoke", overrides={
        "compute": {"num_workers": 0, "torch_threads": 2, "concurrent_trainings": 2},
        "tracking": {"tracking_uri": f"sqlite:///{db}"}})
    run = str(tmp_path / "run")
    trainings = [_sleeper(name, 2.0) for name in ("a", "b", "c")]
    results = train_stages(config, run, trainings)

    a, b, c = (results[name] for name in "abc")
    assert {r["threads"] for r in (a, b, c)} == {1}  # the two slots share torch_threads 2
    assert os.getpid() not in {a["pid"], b["pid"], c["pid"]} and a["pid"] != b["pid"]
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side
    assert c["start"] >= min(a["end"], b["end"]) - 0.1  # a third waits for a free slot
    for name in "abc":
        assert (tmp_path / "run" / "stages" / f"{name}.json").exists()
    assert train_stages(config, run, trainings) == results  # reused: nothing trains again
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    logged = client.search_runs([client.get_experiment_by_name("side-by-side").experiment_id])
    assert sorted(r.info.run_name for r in logged) == ["a", "b", "c"]

    # with Train workers, or one slot, the trainings run in this process, one after the other
    workers = config.model_copy(update={"compute": config.compute.model_copy(
        update={"num_workers": 1})})
    d, e = train_stages(workers, run, [_sleeper("d", 0.1), _sleeper("e", 0.1)]).values()
    assert d["pid"] == e["pid"] == os.getpid() and d["threads"] == 2 and d["end"] <= e["start"]


def test_a_later_training_takes_the_first_free_slot_once_what_it_needs_has_trained(
    ray_session: None, tmp_path: Path
) -> None:
    from boneaug.config import load_config
    from boneaug.workflow import Later, train_stages

    config = load_config("smoke", overrides={
        "compute": {"num_workers": 0, "torch_threads": 2, "concurrent_trainings": 2},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run = str(tmp_path / "run")
    seen: list[set[str]] = []

    def after_b(results: dict) -> list:  # what an arm's plan does once its baseline is there
        seen.append(set(results))
        return [_sleeper("c", 1.0), Later(("c", "a"), lambda results: [_sleeper("d", 0.1)])]

    results = train_stages(config, run, [_sleeper("a", 6.0), _sleeper("b", 1.0),
                                         Later(("b",), after_b)])
    a, b, c, d = (results[name] for name in "abcd")
    assert seen == [{"b"}]  # made as soon as b was done, a still training
    assert b["end"] <= c["start"] < a["end"]  # c took b's slot beside the long a
    assert d["start"] >= max(a["end"], c["end"]) - 0.1
    # the plan again: everything reused, the Later made from the stored results
    assert train_stages(config, run, [_sleeper("a", 6.0), _sleeper("b", 1.0),
                                      Later(("b",), after_b)]) == results

    # one slot: the same plan, one training after the other in the order they became ready
    serial = config.model_copy(update={"compute": config.compute.model_copy(
        update={"num_workers": 1})})
    order = train_stages(serial, str(tmp_path / "serial"), [
        _sleeper("a", 0.1), Later(("a",), lambda results: [_sleeper("c", 0.1)]),
        _sleeper("b", 0.1)])
    assert sorted(order, key=lambda n: order[n]["start"]) == ["a", "b", "c"]

    with pytest.raises(RuntimeError, match=r"wait for \['baseline-s1'\], which nothing trains"):
        train_stages(serial, str(tmp_path / "serial"),
                     [Later(("baseline-s1",), lambda results: [])])


def test_a_failed_training_stops_the_ones_beside_it_and_records_nothing(
    ray_session: None, tmp_path: Path
) -> None:
    import time

    from boneaug.config import load_config
    from boneaug.errors import DataError
    from boneaug.workflow import Training, train_stages

    def bad(config: object) -> dict:
        raise DataError("train split has no positive rows: check the cohort's labels")

    config = load_config("smoke", overrides={
        "compute": {"num_workers": 0, "concurrent_trainings": 2},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run = str(tmp_path / "run")
    start = time.monotonic()
    with pytest.raises(DataError, match="no positive rows"):
        train_stages(config, run, [_sleeper("slow", 120.0), Training("bad", ["bad"], bad)])
    assert time.monotonic() - start < 60  # the slow one was stopped, not waited for
    assert not (tmp_path / "run" / "stages").exists()
