from __future__ import annotations

from pathlib import Path

import pytest

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


def test_an_arm_at_a_t_that_keeps_no_candidate_is_the_seeds_baseline_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from boneaug.config import load_config
    from boneaug.eval.report import read_predictions
    from boneaug.workflow import ARMS, _Arm, _train_arm

    (tmp_path / "candidates").mkdir()
    pq.write_table(pa.table({"image_id": ["b", "a"], "score": [0.40, 0.65]}),
                   tmp_path / "candidates" / "part-0.parquet")
    pq.write_table(pa.table({"image_id": ["x", "y", "z"], "split": ["val", "test", "test"],
                             "label": [1, 0, 1], "score": [0.9, 0.2, 0.7]}),
                   tmp_path / "baseline.parquet")
    baseline = {"model": "models:/boneaug-drn-femur/4", "version": "4", "val_auc": 0.69,
                "predictions": str(tmp_path / "baseline.parquet")}
    run = str(tmp_path / "run")
    arm = _train_arm(load_config("smoke"), run, "femur", "models:/boneaug-drn-fracture/1",
                     _Arm(ARMS["oracle"], 2, {}, {"candidates": str(tmp_path / "candidates")},
                          baseline), (0.70, 0.90), False)

    assert arm.trained == {0.70: baseline | {"samples": 0}, 0.90: baseline | {"samples": 0}}
    assert not (tmp_path / "run" / "stages").exists()  # no DRN trained
    assert "[drn-oracle-t0.90-s2] no candidate scores >= 0.90: the arm is baseline-s2" in \
        capsys.readouterr().out
    ids, labels, scores = read_predictions(run, "oracle-t0.70-s2")["test"]
    assert list(ids) == ["y", "z"] and list(scores) == pytest.approx([0.2, 0.7])
