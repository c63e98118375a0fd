"""One trial of a sweep, in its Tune trial process: its MLflow run nested under the sweep's, its
configuration, its training (an augmented DRN, or UNIT on its patch sets) and what it reports to
Tune while it trains."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from boneaug import storage, tracking
from boneaug.config import BoneaugConfig, TrackingConfig
from boneaug.errors import DataError
from boneaug.train.distributed import Publish, Workers
from boneaug.tune.spaces import QUALITY_KEYS, SweepKind, apply_params, quality_objective

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its parameters (handed over with tune.with_parameters)."""

    kind: SweepKind
    body_part: str
    config: dict[str, Any]  # BoneaugConfig.model_dump(mode="json") of the base configuration
    data_uri: str
    run_uri: str
    sweep_uri: str
    sweep_name: str
    experiment: str
    parent_run_id: str
    tracking_uri: str
    inputs: dict[str, Any]  # candidates / init_from (threshold), patches (patches, unit)
    critic: dict[str, Any] | None = None  # CriticConfig fields for fit_unit's quality probe


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """`params`, flattened, on an MLflow run (in batches of MLflow's 100)."""
    from mlflow.entities import Param as MlflowParam

    items = [MlflowParam(k, v) for k, v in tracking.flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune's trainable (function API): one trial of any kind; reports to ``ray.tune.report``."""
    import ray.tune
    from mlflow import MlflowClient

    from boneaug.progress import quiet_ray

    quiet_ray()  # a trial makes its own datasets, as a job's driver does
    trial_id = ray.tune.get_context().get_trial_id()
    tracking.configure(TrackingConfig(tracking_uri=context.tracking_uri))
    client = MlflowClient(tracking_uri=context.tracking_uri, registry_uri=context.tracking_uri)
    base = BoneaugConfig.model_validate(context.config)
    config = apply_params(base, context.kind, context.body_part, params)
    trial_uri = storage.join(context.sweep_uri, "trials", trial_id)
    run_id = _trial_run(client, context, trial_id, params, trial_uri)
    common = {"mlflow_run_id": run_id}
    if context.kind == "threshold":
        metrics = _threshold_trial(config, context, params, trial_uri, run_id)
        ray.tune.report({**common, **metrics, "iteration": 1, "final": 1})
    else:
        _unit_trial(config, context, trial_uri, run_id, client,
                    report=lambda m: ray.tune.report({**common, **m}))


def _trial_run(client: Any, context: TrialContext, trial_id: str, params: Mapping[str, Any],
               trial_uri: str) -> str:
    """The trial's MLflow run, nested under the sweep's: found again when the trial resumes."""
    experiment_id = client.get_experiment_by_name(context.experiment).experiment_id
    query = (f"tags.`mlflow.parentRunId` = '{context.parent_run_id}' and "
             f"tags.`boneaug.trial_id` = '{trial_id}'")
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{context.sweep_name}-{trial_id}", tags={
        "mlflow.parentRunId": context.parent_run_id, "boneaug.sweep": context.sweep_name,
        "boneaug.trial_id": trial_id, "boneaug.trial_uri": trial_uri})
    log_params(client, run.info.run_id, {"tune": dict(params)})
    return run.info.run_id


def _check_nested(client: Any, context: TrialContext, run_id: str, trainer_run_id: str) -> None:
    """The trainer should have logged into the trial's run; if it made its own, nest that one
    too."""
    if trainer_run_id != run_id:
        log.warning("the trainer logged into MLflow run %s, not the trial's run %s; "
                    "nesting it as well", trainer_run_id, run_id)
        client.set_tag(trainer_run_id, "mlflow.parentRunId", context.parent_run_id)


def _threshold_trial(config: BoneaugConfig, context: TrialContext, params: Mapping[str, Any],
                     trial_uri: str, run_id: str) -> dict[str, Any]:
    """Select the candidates at t, train the augmented DRN, score it (val AUC chooses; test
    recorded)."""
    from mlflow import MlflowClient

    from boneaug.augment.pipeline import select_augmented
    from boneaug.data.datasets import classification_splits
    from boneaug.train.classifier import ClassifierData, fit_classifier, step_matched

    t = float(params["t"])
    selected = select_augmented(context.inputs["candidates"], t)
    splits = classification_splits(context.run_uri, augmented=selected,
                                   max_train_negatives=config.drn.max_train_negatives,
                                   seed=config.drn.data_seed)
    rows = splits["train"].count()
    drn = step_matched(config.drn, rows=rows, baseline_rows=rows - selected.num_rows)
    result = fit_classifier(
        drn, ClassifierData(splits["train"], splits["val"], splits["test"]),
        publish=_trial_publish(context, storage.join(trial_uri, "drn"), trial_uri, run_id),
        workers=Workers.from_config(config, at_least=1), init_from=context.inputs.get("init_from"),
        image_size=(config.image.height, config.image.width),
    )
    metrics = {"augmented_samples": int(selected.num_rows), "val_auc": float(result.best_val_auc),
               "test_auc": auc_on_test(result.predictions_uri)}
    client = MlflowClient(tracking_uri=context.tracking_uri)
    _check_nested(client, context, run_id, result.mlflow_run_id)
    client.log_batch(run_id, metrics=_metrics({f"tune/{k}": v for k, v in metrics.items()}))
    client.set_tag(run_id, "model_uri", result.model_uri)
    return {**metrics, "model_uri": result.model_uri}


def _trial_publish(context: TrialContext, run_uri: str, trial_uri: str, run_id: str) -> Publish:
    """Where a trial's trainer writes: the trial's folder and its MLflow run (nested under the
    sweep's), no registry."""
    return Publish(run_uri, context.experiment,
                   run_name=f"{context.sweep_name}-{Path(trial_uri).name}",
                   tracking=TrackingConfig(tracking_uri=context.tracking_uri),
                   mlflow_run_id=run_id)


def auc_on_test(predictions_uri: str) -> float:
    """ROC AUC on the test split of a classifier's predictions (NaN when one class is missing)."""
    import pyarrow.compute as pc

    from boneaug.eval.metrics import roc_auc

    table = storage.read_parquet(predictions_uri)
    test = table.filter(pc.equal(table.column("split"), "test"))
    labels = test.column("label").to_numpy()
    if test.num_rows == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc(labels, test.column("score").to_numpy()))


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _metrics(values: Mapping[str, Any], step: int = 0) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if finite(v)]


def _patch_datasets(patches_uri: str) -> dict[str, Any]:
    from boneaug.data.datasets import patch_dataset

    return {kind: patch_dataset(storage.join(patches_uri, kind)) for kind in ("lesion", "normal")}


def _unit_trial(config: BoneaugConfig, context: TrialContext, trial_uri: str, run_id: str,
                client: Any, *, report: Callable[[dict[str, Any]], None]) -> None:
    """(patches: re-make the patch sets) -> fit_unit, forwarding its quality signal to Tune."""
    from boneaug.data.patch_sets import load_patch_array
    from boneaug.eval.quality import CriticConfig, QualitySets
    from boneaug.train.unit import fit_unit

    base_patches = context.inputs["patches"]
    patches_uri = base_patches
    if context.kind == "patches":
        patches_uri = make_trial_patches(config, context.body_part, data_uri=context.data_uri,
                                         run_uri=context.run_uri, trial_uri=trial_uri)
    quality = QualitySets(lesion=load_patch_array(storage.join(base_patches, "lesion")),
                          normal=load_patch_array(storage.join(base_patches, "normal")),
                          source=load_patch_array(storage.join(patches_uri, "source")))
    data = _patch_datasets(patches_uri)
    critic = CriticConfig(**context.critic) if context.critic else None  # None: fit_unit's default

    def fit() -> Any:
        return fit_unit(config.unit, data["lesion"], data["normal"],
                        publish=_trial_publish(context, trial_uri, trial_uri, run_id),
                        workers=Workers.from_config(config, at_least=1),
                        quality_sets=quality, critic_config=critic)

    watcher = QualityWatcher(client, run_id, final_iteration=config.unit.iterations)
    result = run_reporting(fit, watcher.new, report)
    _check_nested(client, context, run_id, result.mlflow_run_id)
    final = {"frac_source": result.frac_source, "frac_translated": result.frac_translated,
             "gain": result.quality_gain, "fd_ratio": result.fd_ratio}
    if final["gain"] is None:
        raise DataError(f"UNIT trial {trial_uri} finished without a quality signal "
                        "(no quality sets?)")
    final["objective"] = quality_objective(final["gain"], final["fd_ratio"])
    client.log_batch(run_id, metrics=_metrics({f"tune/{k}": v for k, v in final.items()},
                                              result.iterations))
    client.set_tag(run_id, "model_uri", result.model_uri)
    report({**final, "iteration": result.iterations, "final": 1, "model_uri": result.model_uri})


def make_trial_patches(config: BoneaugConfig, body_part: str, *, data_uri: str, run_uri: str,
                       trial_uri: str) -> str:
    """The patch sets of `config`'s s and n under ``<trial>/patches`` (kept when already there).

    make_patch_sets plans from ``<run>/images``; the trial prefix gets a metadata-only view of the
    base run's image shards (the planning columns, no pixels) under ``<trial>/images``.
    """
    from boneaug.data.patch_sets import META_COLUMNS, make_patch_sets

    settings = config.patches.body_parts[body_part]  # type: ignore[index]
    patches_uri = storage.join(trial_uri, "patches")
    done = storage.read_manifest(patches_uri)
    if done is not None and done.get("settings") == settings.model_dump():
        return patches_uri
    images_uri = storage.join(run_uri, "images")
    base = storage.read_manifest(images_uri)
    if base is None:
        raise DataError(f"{images_uri} has no manifest: ingest the run first (jobs/ingest.py)")
    view_uri = storage.join(trial_uri, "images")
    storage.write_parquet(storage.join(view_uri, "meta.parquet"),
                          storage.read_parquet(images_uri, columns=META_COLUMNS))
    storage.publish_manifest(view_uri, {**base, "view_of": images_uri, "columns": META_COLUMNS})
    make_patch_sets(data_uri=data_uri, run_uri=trial_uri, body_part=body_part, settings=settings,
                    size=config.patches.size, min_mean_intensity=config.patches.min_mean_intensity,
                    seed=config.patches.seed, max_source_images=config.augment.max_source_images)
    return patches_uri


class QualityWatcher:
    """New quality-signal steps of an MLflow run (fit_unit's rank 0 logs them every sample_every),
    as Tune results; the final iteration is left to the trial's own final report."""

    def __init__(self, client: Any, run_id: str, *, final_iteration: int) -> None:
        self.client, self.run_id, self.final_iteration = client, run_id, final_iteration
        self.last = 0

    def new(self) -> list[dict[str, Any]]:
        history = {k: {m.step: m.value
                       for m in self.client.get_metric_history(self.run_id, f"quality/{k}")}
                   for k in QUALITY_KEYS}
        steps = sorted(set(history["frac_source"]) & set(history["frac_translated"]))
        out = []
        for step in steps:
            if step <= self.last or step >= self.final_iteration:
                continue
            fd = history["fd_ratio"].get(step)
            gain = history["frac_translated"][step] - history["frac_source"][step]
            out.append({"iteration": int(step), "frac_source": history["frac_source"][step],
                        "frac_translated": history["frac_translated"][step], "gain": gain,
                        "fd_ratio": fd, "objective": quality_objective(gain, fd)})
            self.last = step
        return out


def run_reporting(fit: Callable[[], T], poll: Callable[[], list[dict[str, Any]]],
                  report: Callable[[dict[str, Any]], None], *, every_s: float = 2.0) -> T:
    """`fit()` in a helper thread; meanwhile every result `poll()` finds goes to `report`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="boneaug-trial-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(every_s)
        for result in poll():
            report(result)
    if "error" in box:
        raise box["error"]
    for result in poll():
        report(result)
    return box["result"]




__all__ = [
    "QualityWatcher", "TrialContext", "auc_on_test", "finite", "log_params", "make_trial_patches",
    "run_reporting", "run_trial",
]
