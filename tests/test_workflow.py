from __future__ import annotations

from pathlib import Path

from boneaug.workflow import stage


def test_stage_reuses_results_for_the_same_inputs_and_reruns_on_change(tmp_path: Path) -> None:
    calls: list[int] = []

    def work() -> dict[str, int]:
        calls.append(1)
        return {"value": len(calls)}

    run = str(tmp_path / "run")
    assert stage(run, "step", {"lr": 1e-4}, work) == {"value": 1}
    assert stage(run, "step", {"lr": 1e-4}, work) == {"value": 1}  # reused, not recomputed
    assert len(calls) == 1
    assert stage(run, "step", {"lr": 2e-4}, work) == {"value": 2}  # inputs changed: recomputed
    assert stage(run, "other", {"lr": 2e-4}, work) == {"value": 3}  # stages are independent


def test_a_failed_stage_records_nothing(tmp_path: Path) -> None:
    run = str(tmp_path / "run")

    def boom() -> dict[str, int]:
        raise RuntimeError("worker died")

    try:
        stage(run, "step", 1, boom)
    except RuntimeError:
        pass
    assert not (tmp_path / "run" / "stages" / "step.json").exists()
    assert stage(run, "step", 1, lambda: {"ok": 1}) == {"ok": 1}
