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


class _RunsCode:
    """Unpickling this calls os.system: what a malicious registry artifact would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _register(model: object, example: object, name: str, config: TrackingConfig) -> Path:
    """Register `model` as `name`@champion; the local directory of its logged artifact."""
    import mlflow

    with tracking.start_run("boneaug/tests/tracking", name, tracking=config) as run:
        version = tracking.log_torch_model(model, name="model", input_example=example,
                                           registered_name=name, alias="champion")
    assert version == "1"
    return Path(mlflow.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"),
                "model")


@pytest.mark.parametrize("kind", ["drn", "unit_translator", "patch_critic", "critic_ensemble"])
def test_every_registered_kind_loads_back_as_weights_and_spec_with_identical_outputs(
    kind: str, registry: TrackingConfig
) -> None:
    import numpy as np
    import torch

    from boneaug.eval.quality import CriticEnsemble, PatchCritic
    from boneaug.models.drn import build_drn
    from boneaug.models.unit import UNIT, UnitArch

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # PatchCritic's default init
    model, shape = {
        "drn": lambda: (build_drn("drn_c_26", width_mult=0.125, generator=gen), (2, 1, 64, 32)),
        "unit_translator": lambda: (UNIT(UnitArch(width=8, n_res=2), generator=gen)
                                    .translator("h2l"), (2, 1, 32, 32)),
        "patch_critic": lambda: (PatchCritic(8, 32), (2, 1, 32, 32)),
        "critic_ensemble": lambda: (CriticEnsemble([PatchCritic(8, 32) for _ in range(3)]),
                                    (2, 1, 32, 32)),
    }[kind]()
    example = np.random.default_rng(0).random(shape, dtype=np.float32)
    stored = _register(model.eval(), example, f"boneaug-{kind}", registry)
    loaded = tracking.load_torch_model(f"models:/boneaug-{kind}@champion", tracking=registry)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(example)),
                                   model(torch.from_numpy(example)), rtol=0, atol=0)
    assert sorted(p.name for p in stored.iterdir()) == ["MLmodel", "input_example.npy",
                                                         "weights.pt"]


def test_a_malicious_pickle_in_the_registry_is_refused_and_never_runs(
    tmp_path: Path, registry: TrackingConfig
) -> None:
    import numpy as np
    import torch

    from boneaug.errors import ModelError
    from boneaug.models.drn import build_drn

    model = build_drn("drn_c_26", width_mult=0.125, generator=torch.Generator().manual_seed(0))
    stored = _register(model.eval(), np.zeros((1, 1, 64, 32), np.float32), "boneaug-drn-x",
                       registry)
    # someone with write access to the artifact store swaps the weights for a pickle bomb
    marker = tmp_path / "code-ran"
    torch.save({"conv1.weight": _RunsCode(marker)}, stored / "weights.pt")
    with pytest.raises(ModelError, match="refused without running it"):
        tracking.load_torch_model("models:/boneaug-drn-x@champion", tracking=registry)
    assert not marker.exists()
    # the pickle really is live: plain torch.load would have run it
    torch.load(stored / "weights.pt", weights_only=False)
    assert marker.exists()


def test_a_pickled_mlflow_pytorch_model_is_refused_unloaded(
    tmp_path: Path, registry: TrackingConfig
) -> None:
    import mlflow
    import torch

    from boneaug.errors import ModelError

    tracking.configure(registry)
    mlflow.set_experiment("boneaug/tests/legacy")
    with mlflow.start_run():
        mlflow.pytorch.log_model(torch.nn.Linear(2, 1), name="model",
                                 serialization_format="pickle",
                                 registered_model_name="boneaug-legacy",
                                 pip_requirements=["torch"])
    with pytest.raises(ModelError, match="not in boneaug's format.*never unpickles"):
        tracking.load_torch_model("models:/boneaug-legacy/1", tracking=registry)
    with pytest.raises(ModelError, match="not in the registry|cannot load"):
        tracking.load_torch_model("models:/boneaug-missing/1", tracking=registry)


def test_a_model_without_an_architecture_spec_cannot_be_registered(
    registry: TrackingConfig
) -> None:
    import numpy as np
    import torch

    from boneaug.errors import ModelError

    with (tracking.start_run("boneaug/tests/tracking", "nospec", tracking=registry),
          pytest.raises(ModelError, match="carries no architecture spec")):
        tracking.log_torch_model(torch.nn.Linear(2, 1), name="model",
                                 input_example=np.zeros((1, 2), np.float32))


def test_a_logged_but_unregistered_model_loads_by_its_run_uri(registry: TrackingConfig) -> None:
    import numpy as np
    import torch

    from boneaug.eval.quality import PatchCritic

    model = PatchCritic(8, 32).eval()
    with tracking.start_run("boneaug/tests/tracking", "unregistered", tracking=registry) as run:
        assert tracking.log_torch_model(model, name="critic",
                                        input_example=np.zeros((1, 1, 32, 32), np.float32)) is None
    loaded = tracking.load_torch_model(f"runs:/{run.info.run_id}/critic", tracking=registry)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
