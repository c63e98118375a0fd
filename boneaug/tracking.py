"""MLflow: tracking URI, runs with flattened params, model registration and loading by alias.

Conventions (DESIGN.md): experiment per job ``boneaug/<body_part>/<job>``; registered models
``boneaug-unit-<body_part>``, ``boneaug-drn-<body_part>``, ``boneaug-drn-<body_part>-aug``;
aliases ``champion`` and ``challenger``. The default tracking URI is a sqlite file in the working
directory (tracking and registry, no server); a cluster sets ``MLFLOW_TRACKING_URI``.

Models are logged without pickle: a state dict (``weights.pt``, loaded with
``weights_only=True``) and the architecture spec in the ``boneaug`` flavor of the ``MLmodel``
file (`boneaug.models.specs`). Anyone who can write to the registry can then at worst make a
model load wrong weights, never run code in a job or the service. MLflow's pt2 format was the
alternative; it fixes the batch size of the input example (torch.export). Loading is tested to
reproduce outputs exactly and to refuse a malicious pickle.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from boneaug.config import TrackingConfig
from boneaug.errors import ModelError

if TYPE_CHECKING:
    import mlflow
    import torch

log = logging.getLogger(__name__)

FLAVOR = "boneaug"  # the MLmodel flavor of a model boneaug registered
WEIGHTS_FILE = "weights.pt"


def tracking_uri(config: TrackingConfig | None = None) -> str:
    """The tracking URI in force: config, then MLFLOW_TRACKING_URI, then ./mlflow.db."""
    if config is not None and config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlflow.db').absolute()}"


def configure(config: TrackingConfig | None = None) -> str:
    """Point mlflow (tracking and registry) at `tracking_uri(config)`; returns the URI.

    The URI is also exported as MLFLOW_TRACKING_URI so Ray workers started afterwards inherit it.
    """
    import mlflow

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # a model is three small files: no bar per download between a job's own progress lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def open_store(config: TrackingConfig | None = None) -> str:
    """`configure`, then open the store once in this process: a fresh sqlite store creates its
    tables on first use, and processes that do so at once fail ("duplicate column name"), so a
    driver opens it before trainings log to it side by side. Returns the URI."""
    import mlflow

    uri = configure(config)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return uri


def artifact_location(experiment: str, uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store
    (``<db dir>/mlartifacts/<experiment>``), so they outlive the process's working directory (a
    `ray job submit` job runs in a temporary copy, and MLflow's default ``./mlruns`` is relative
    to it); None for a tracking server, which decides itself."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).absolute().parent / "mlartifacts" / experiment).as_uri()


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location(name)))
    except MlflowException:  # created meanwhile by another process
        return str(client.get_experiment_by_name(name).experiment_id)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> {"a.b": "value"} strings, as MLflow params want them."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    *,
    tracking: TrackingConfig | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in `experiment` with `params` flattened and logged: a new one named
    `run_name`, or the existing run `run_id` (e.g. a Tune trial's), continued."""
    import mlflow

    configure(tracking)
    mlflow.set_experiment(experiment_id=ensure_experiment(experiment))
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested,
                          tags=dict(tags or {})) as run:
        if params:
            flat = flatten(params)
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i : i + 100]))
        yield run


def log_torch_model(
    model: torch.nn.Module,
    *,
    name: str,
    input_example: np.ndarray,
    registered_name: str | None = None,
    alias: str | None = None,
) -> str | None:
    """Log `model` in the active run as weights plus its architecture spec (no pickle); register
    it (and set `alias`) when a name is given.

    The artifact ``<name>/`` holds ``weights.pt`` (a state dict) and an ``MLmodel`` whose
    ``boneaug`` flavor records the spec (`boneaug.models.specs`), with the signature and input
    example MLflow shows. Returns the registered version, or None when not registered.
    """
    import tempfile

    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model, infer_signature

    from boneaug.models.specs import spec_of

    spec = spec_of(model)
    model = model.eval()
    with torch.no_grad():
        output = model(torch.as_tensor(input_example))
    run_id = mlflow.active_run().info.run_id
    meta = Model(artifact_path=name, run_id=run_id,
                 signature=infer_signature(input_example, output.detach().cpu().numpy()))
    meta.add_flavor(FLAVOR, spec=spec, weights=WEIGHTS_FILE,
                    torch_version=torch.__version__.split("+")[0])
    with tempfile.TemporaryDirectory() as tmp:
        meta.save(os.path.join(tmp, "MLmodel"))
        state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        torch.save(state, os.path.join(tmp, WEIGHTS_FILE))
        np.save(os.path.join(tmp, "input_example.npy"), np.asarray(input_example))
        mlflow.log_artifacts(tmp, name)
    if registered_name is None:
        return None
    # the client, not mlflow.register_model, which prints two lines per registration
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:  # registered before (or meanwhile, by another process)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = str(client.create_model_version(registered_name, mlflow.get_artifact_uri(name),
                                              run_id=run_id).version)
    if alias:
        set_alias(registered_name, alias, version)
    return version


# on a scorer's registered version: the pseudo-label threshold t a chain chose on validation for
# it (with its body part's translator); the service judges `passes_threshold` by it
PSEUDO_LABEL_T_TAG = "pseudo_label_t"


def set_version_tag(registered_name: str, version: str, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(registered_name, version, key, value)


def version_tags(registered_name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(registered_name, version).tags)


def set_alias(registered_name: str, alias: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(registered_name, alias, version)


def resolve(uri: str) -> tuple[str, str | None]:
    """('models:/name@alias' or 'models:/name/3') -> (name, version) from the registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        return uri, None
    ref = uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = ref.partition("/")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        raise ModelError(
            f"model {uri!r} is not in the registry at {tracking_uri()}: {exc.message}. "
            "Train and register it first (see the jobs/ README section) or fix the name/alias."
        ) from exc


def load_torch_model(uri: str, *, tracking: TrackingConfig | None = None) -> torch.nn.Module:
    """A registered (``models:/name@alias``) or logged (``runs:/...``) torch model, in eval mode.

    Only boneaug's own format loads: the architecture is rebuilt from the spec in ``MLmodel``
    and the weights are read with ``weights_only=True``, so nothing in the registry is ever
    unpickled into code. Anything else (a pickled ``mlflow.pytorch`` model, a tampered weights
    file) is refused with a `ModelError`.
    """
    import tempfile

    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from boneaug.models.specs import build_from_spec

    configure(tracking)
    with tempfile.TemporaryDirectory() as tmp:
        try:  # a models:/ URI lands in `tmp` itself, a runs:/ one in tmp/<name>
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            flavors = Model.load(os.path.join(local, "MLmodel")).flavors
        except (MlflowException, OSError) as exc:
            message = getattr(exc, "message", str(exc))
            raise ModelError(f"cannot load model {uri!r} from {tracking_uri(tracking)}: "
                             f"{message}") from exc
        if FLAVOR not in flavors:
            raise ModelError(
                f"model {uri!r} is not in boneaug's format (flavors: {sorted(flavors)}); "
                "boneaug loads only weights plus an architecture spec and never unpickles a "
                "model. Re-register it with boneaug.tracking.log_torch_model.")
        flavor = flavors[FLAVOR]
        model = build_from_spec(flavor["spec"])
        try:
            state = torch.load(os.path.join(local, flavor["weights"]), map_location="cpu",
                               weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # weights_only refuses any pickled object, whatever it holds
            raise ModelError(
                f"model {uri!r}: its weights file is not a plain state dict for a "
                f"{flavor['spec'].get('kind')} network; refused without running it: {exc}"
            ) from exc
    return model.eval()
