"""MLflow conventions against a real sqlite store (tracking + registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from boneaug import tracking
from boneaug.config import TrackingConfig


def test_artifacts_live_beside_the_sqlite_store_not_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    job_dir = tmp_path / "job-working-dir"  # what `ray job submit --working-dir` runs in
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    # restored after: configure() exports it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrackingConfig(tracking_uri=f"sqlite:///{db}")
    with tracking.start_run("boneaug/tibia/unit-test", "r1", {"a": {"b": 1}},
                            tracking=config) as run:
        mlflow.log_text("hello", "notes/hello.txt")
    artifact = (Path(mlflow.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"))
                / "notes" / "hello.txt")
    assert artifact.read_text() == "hello"
    assert artifact.is_relative_to(db.parent / "mlartifacts" / "boneaug/tibia/unit-test")
    assert not (job_dir / "mlruns").exists()
    # the same experiment again: found, not re-created
    assert tracking.ensure_experiment("boneaug/tibia/unit-test") == run.info.experiment_id
    assert mlflow.get_run(run.info.run_id).data.params == {"a.b": "1"}


def test_a_tracking_server_chooses_its_own_artifact_location() -> None:
    assert tracking.artifact_location("x", "http://127.0.0.1:5000") is None
    assert (tracking.artifact_location("e/x", "sqlite:////data/m.db")
            == "file:///data/mlartifacts/e/x")
