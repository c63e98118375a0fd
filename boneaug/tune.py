"""Ray Tune sweeps over the paper's hyper-parameters, tracked in MLflow.

Three sweeps, one per job (``jobs/tune_threshold.py``, ``jobs/tune_patches.py``,
``jobs/tune_unit.py``):

- ``threshold`` (SPEC 5): a grid over the pseudo-label threshold t. The blended candidates are
  made once (workflow stages); each trial selects by t and trains an augmented DRN. Objective:
  validation AUC (``val_auc``); the test AUC is recorded, never used to choose.
- ``patches`` (SPEC 2): s in {1, 2} x n over a range. Each trial re-makes the patch sets under its
  own prefix and trains UNIT on them. Objective: the translator quality signal (below). ASHA.
- ``unit`` (SPEC 3): lambda0..lambda4 log-uniform around their defaults and Adam's lr, OptunaSearch
  (TPE) when optuna is installed, seeded random search otherwise. Objective and ASHA as above.

Objective of the UNIT sweeps: ``objective = gain - max(0, fd_ratio - 1)`` with ``gain =
frac_translated - frac_source`` from `boneaug.eval.quality` (a patch critic's lesion calls on
translated vs untranslated source patches). The penalty is there because a critic's verdict on
out-of-distribution noise is arbitrary (an untrained generator can score gain ~ 1): translations
whose critic features are further from real lesions than healthy patches are (fd_ratio > 1) lose
what they gained. For the patch sweep the critic is trained on the *base* translation sets (the
profile's s and n) in every trial, so the yardstick does not move with the parameter being tuned;
only the translated source patches come from the trial's own patch sets.

Intermediate results for ASHA: fit_unit logs the quality signal to its MLflow run every
``unit.sample_every`` iterations; the trial runs fit_unit in a helper thread and forwards every
new step to ``ray.tune.report`` (``iteration`` is ASHA's time attribute). A trial stopped by
ASHA takes its Train run with it (Train's controller is owned by the trial's process).

MLflow: experiment ``boneaug/<body_part>/tune_<kind>``; one parent run per sweep (settings as
params, results table and best.yaml as artifacts, best metrics); each trial is one child run
(``mlflow.parentRunId``), the very run that fit_classifier / fit_unit log their params, per-epoch
or per-iteration metrics and model into (it is handed to them through MLflow's ``MLFLOW_RUN_ID``),
plus the trial's tuned params (``tune.*``) and final metrics.

Storage (``<run>`` = ``<out>/runs/<run-id>``, any storage URI)::

    <run>/tune/<kind>-<fingerprint>/            Ray Tune's experiment (RunConfig storage_path/name)
        sweep.json                              settings + parent MLflow run id (written first)
        trials/<trial_id>/...                   each trial's outputs (DRN or patches + UNIT)
        results.json, results.md                the table (also in MLflow)
        best.yaml                               the profile with the best values: --config of
                                                any job

The fingerprint covers the sweep's settings and the base configuration, so running the same
command again restores the same Tune experiment (``Tuner.restore``: finished trials are kept,
unfinished and errored ones resumed, and each resumed trial continues its own Ray Train run from
its checkpoints), while a changed command starts a new one beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from boneaug import storage, tracking
from boneaug.config import BoneaugConfig, ComputeConfig, TrackingConfig, UnitConfig, dump_config
from boneaug.errors import ConfigError, DataError, SweepIncomplete
from boneaug.train.distributed import Publish, Workers

if TYPE_CHECKING:
    from boneaug.eval.quality import CriticConfig

log = logging.getLogger(__name__)

SweepKind = Literal["threshold", "patches", "unit"]
KINDS: tuple[SweepKind, ...] = ("threshold", "patches", "unit")
UNIT_PARAMS = ("lambda_gan", "lambda_kl", "lambda_recon", "lambda_kl_cyc", "lambda_cyc", "lr")
QUALITY_KEYS = ("frac_source", "frac_translated", "gain", "fd_ratio")
TRIAL_CPUS = 0.01  # a trial only drives its Ray Train run, whose workers request their own CPUs
T = TypeVar("T")


# ---- search spaces ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One dimension of a search space: a grid, a log-uniform range or an integer range."""

    kind: Literal["grid", "loguniform", "randint"]
    values: tuple[float, ...]  # grid: the values; loguniform / randint: (low, high), both inclusive

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError(f"{self.kind} search dimension without values")
        if self.kind != "grid" and (len(self.values) != 2 or self.values[0] > self.values[1]):
            raise ConfigError(f"{self.kind} needs (low, high) with low <= high, got {self.values}")
        if self.kind == "loguniform" and self.values[0] <= 0:
            raise ConfigError(f"loguniform needs low > 0, got {self.values}")

    def to_tune(self) -> Any:
        from ray import tune

        low, high = self.values[0], self.values[-1]
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "randint":
            return tune.randint(int(low), int(high) + 1)  # Tune's upper bound is exclusive
        if low == high:
            return low
        return tune.loguniform(low, high)

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


Space = dict[str, Param]


def threshold_space(grid: Sequence[float]) -> Space:
    """t over `grid` (paper: 0.70, 0.85, 0.90, 0.95)."""
    values = tuple(float(t) for t in grid)
    if not values or any(not 0 <= t <= 1 for t in values):
        raise ConfigError(f"thresholds must be in [0, 1], got {list(grid)}")
    return {"t": Param("grid", tuple(sorted(set(values))))}


def patches_space(s_values: Sequence[float] = (1.0, 2.0),
                  n_range: tuple[int, int] = (3, 12)) -> Space:
    """s over a grid (paper: 1 or 2) and n uniformly in the integer range (paper: 7-10)."""
    if any(s < 1 for s in s_values):
        raise ConfigError(f"s must be >= 1 (patch side / box side), got {list(s_values)}")
    if n_range[0] < 1:
        raise ConfigError(f"n must be >= 1, got the range {n_range}")
    return {"s": Param("grid", tuple(sorted({float(s) for s in s_values}))),
            "n": Param("randint", (int(n_range[0]), int(n_range[1])))}


def unit_space(unit: UnitConfig, *, factor: float = 10.0, lr_factor: float = 10.0) -> Space:
    """lambda0..lambda4 log-uniform in [default / factor, default * factor], lr likewise.

    A weight that is 0 in `unit` stays 0 (its term is switched off; log-uniform cannot hold 0).
    """
    if factor < 1 or lr_factor < 1:
        raise ConfigError(f"factors must be >= 1, got factor={factor}, lr_factor={lr_factor}")
    space: Space = {}
    for name in UNIT_PARAMS:
        value = float(getattr(unit, name))
        spread = lr_factor if name == "lr" else factor
        if value > 0:
            space[name] = Param("loguniform", (value / spread, value * spread))
    return space


def apply_params(config: BoneaugConfig, kind: SweepKind, body_part: str,
                 params: Mapping[str, Any]) -> BoneaugConfig:
    """`config` with a trial's values put where the steps read them (validated again).

    threshold: ``augment.thresholds = (t,)`` and ``augment.t[body_part] = t`` (the augment jobs then
    train one augmented model at the tuned t); patches: ``patches.body_parts[body_part].s / .n``;
    unit: the ``unit.lambda_*`` and ``unit.lr`` fields.
    """
    data = config.model_dump(mode="json")
    known = {"threshold": ("t",), "patches": ("s", "n"), "unit": UNIT_PARAMS}[kind]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{kind} sweep has no parameter(s) {unknown}; it tunes {list(known)}")
    if kind == "threshold" and "t" in params:
        data["augment"]["thresholds"] = [float(params["t"])]
        data["augment"]["t"][body_part] = float(params["t"])
    elif kind == "patches":
        part = data["patches"]["body_parts"][body_part]
        part.update({k: (int(v) if k == "n" else float(v)) for k, v in params.items()})
    elif kind == "unit":
        data["unit"].update({k: float(v) for k, v in params.items()})
    try:
        return BoneaugConfig.model_validate(data)
    except Exception as exc:  # pydantic's ValidationError; say which trial values broke it
        raise ConfigError(
            f"{kind} trial values {dict(params)} give an invalid config: {exc}") from exc


def quality_objective(gain: float, fd_ratio: float | None) -> float:
    """The UNIT sweeps' objective: gain, less how far fd_ratio exceeds 1 (see the module
    docstring)."""
    if fd_ratio is None or not math.isfinite(fd_ratio):
        return gain
    return gain - max(0.0, fd_ratio - 1.0)


# ---- resources -----------------------------------------------------------------------------
def trial_resources(cluster: Mapping[str, float]) -> dict[str, float]:
    """What a trial's own process reserves: almost nothing, and a ``tune_driver`` slot when the
    cluster has them (cluster.yaml pins trial drivers to the head that way)."""
    resources = {"CPU": TRIAL_CPUS}
    if cluster.get("tune_driver", 0) >= 1:
        resources["tune_driver"] = 1.0
    return resources


def max_concurrent(compute: ComputeConfig, cluster: Mapping[str, float], *,
                   reserve_cpus: float = 1.0) -> int:
    """Trials that fit at once: the cluster's CPUs less `reserve_cpus`, over what one trial holds
    (its Train workers' CPUs and its own small share); GPUs and ``tune_driver`` slots likewise.

    The reserve must stay a whole CPU: Ray Data's tasks (1 CPU each) that feed the Train workers
    run outside the trials' reservations, and with less than one CPU free none can start (seen:
    two smoke trials holding 1.02 of 2 CPUs waited forever on a 1-CPU Project task).
    """
    workers = max(1, compute.num_workers)
    per_trial = workers * compute.cpus_per_worker + TRIAL_CPUS
    usable = float(cluster.get("CPU", 0.0)) - reserve_cpus
    limit = int(usable // per_trial + 1e-9) if usable >= per_trial else 1
    if compute.use_gpu:
        limit = min(limit, int(cluster.get("GPU", 0.0) // workers))
    if cluster.get("tune_driver", 0) >= 1:
        limit = min(limit, int(cluster["tune_driver"]))
    return max(1, limit)


# ---- settings, context, results ------------------------------------------------------------
@dataclass(frozen=True)
class SweepSettings:
    """How to sweep. `num_samples` is per grid point (Tune's meaning)."""

    kind: SweepKind
    body_part: str
    space: Space
    num_samples: int = 1
    search: Literal["grid", "random", "optuna"] = "grid"
    scheduler: Literal["fifo", "asha"] = "fifo"
    # UNIT iterations before ASHA may stop a trial (default: sample_every)
    asha_grace: int | None = None
    asha_reduction: int = 2
    max_concurrent: int | None = None  # None: from the cluster's resources (`max_concurrent`)
    max_failures: int = 0  # Tune retries per trial (each retry resumes its Train run)
    seed: int = 0
    verbose: int = 1

    @property
    def metric(self) -> str:
        return "val_auc" if self.kind == "threshold" else "objective"

    def describe(self) -> dict[str, Any]:
        """What identifies the sweep (the fingerprint's input; also the parent run's params)."""
        return {"kind": self.kind, "body_part": self.body_part,
                "space": {k: v.describe() for k, v in sorted(self.space.items())},
                "num_samples": self.num_samples, "search": self.search, "scheduler": self.scheduler,
                "asha_grace": self.asha_grace, "asha_reduction": self.asha_reduction,
                "seed": self.seed}


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


@dataclass(frozen=True)
class SweepResult:
    kind: SweepKind
    body_part: str
    sweep_uri: str
    experiment: str
    parent_run_id: str
    rows: list[dict[str, Any]]  # one per trial: params, metrics, status
    best: dict[str, Any]  # the chosen row
    best_config_uri: str
    markdown: str
    resumed: bool

    @property
    def best_params(self) -> dict[str, Any]:
        return {k: self.best[k] for k in _param_names(self.kind, self.rows)}


def _param_names(kind: SweepKind, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    order = {"threshold": ("t",), "patches": ("s", "n"), "unit": UNIT_PARAMS}[kind]
    return [k for k in order if any(k in r for r in rows)]


# ---- the driver ----------------------------------------------------------------------------
def _fingerprint(settings: SweepSettings, config: BoneaugConfig, inputs: Mapping[str, Any],
                 critic: Mapping[str, Any] | None) -> str:
    blob = json.dumps({"settings": settings.describe(), "config": config.model_dump(mode="json"),
                       "inputs": dict(inputs), "critic": critic}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param as MlflowParam

    items = [MlflowParam(k, v) for k, v in tracking.flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def _parent_run(client: Any, experiment_id: str, state_uri: str, name: str,
                params: Mapping[str, Any]) -> tuple[str, bool]:
    """(parent run id, resumed): the sweep's run from ``sweep.json`` when it exists, else a new
    one."""
    from mlflow.exceptions import MlflowException

    if storage.exists(state_uri):
        run_id = json.loads(storage.read_bytes(state_uri))["parent_run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("sweep %s names MLflow run %s, which %s does not have; starting a new one",
                        state_uri, run_id, tracking.tracking_uri())
        else:
            client.update_run(run_id, status="RUNNING")
            return run_id, True
    run = client.create_run(experiment_id, run_name=name, tags={"boneaug.sweep": name})
    _log_params(client, run.info.run_id, params)
    storage.write_text(state_uri, json.dumps({"parent_run_id": run.info.run_id, "name": name,
                                              "settings": params}, indent=2, default=str))
    return run.info.run_id, False


def _scheduler(settings: SweepSettings, config: BoneaugConfig) -> Any:
    if settings.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    if settings.kind == "threshold":
        raise ConfigError("the threshold sweep trains each t once: use the fifo scheduler")
    unit = config.unit
    grace = settings.asha_grace or min(unit.sample_every, unit.iterations)
    return ASHAScheduler(time_attr="iteration", max_t=unit.iterations, grace_period=max(1, grace),
                         reduction_factor=settings.asha_reduction)


def _search(settings: SweepSettings, concurrent: int) -> Any:
    """The search algorithm; Tune applies `max_concurrent_trials` to a Searcher (Optuna) itself,
    but a BasicVariantGenerator passed in must carry the limit (Tune would ignore it)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if settings.search == "optuna":
        optuna_search = optuna_searcher(settings)
        if optuna_search is not None:
            return optuna_search
        log.warning("optuna is not installed: the %s sweep samples at random instead",
                    settings.kind)
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=settings.seed)


def optuna_searcher(settings: SweepSettings) -> Any | None:
    """Optuna's TPE over `settings.space` (seeded), or None when optuna is not installed."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        return None
    from ray.tune.search.optuna import OptunaSearch

    if any(p.kind == "grid" for p in settings.space.values()):
        raise ConfigError("OptunaSearch takes ranges, not grid_search: "
                          "use search='random' for grids")
    return OptunaSearch(metric=settings.metric, mode="max", seed=settings.seed)


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _new_tuner(settings: SweepSettings, config: BoneaugConfig, trainable: Any, *, name: str,
               storage_path: str, filesystem: Any, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = _search(settings, concurrent)
    limit = None if isinstance(search, BasicVariantGenerator) else concurrent  # it carries its own
    return tune.Tuner(
        trainable,
        param_space={k: p.to_tune() for k, p in settings.space.items()},
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode="max", num_samples=settings.num_samples, search_alg=search,
            scheduler=_scheduler(settings, config), max_concurrent_trials=limit,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            verbose=settings.verbose,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        ),
    )


def run_sweep(
    config: BoneaugConfig,
    settings: SweepSettings,
    *,
    data_uri: str,
    run_uri: str,
    inputs: Mapping[str, Any],
    critic: CriticConfig | None = None,
) -> SweepResult:
    """Run (or resume) one sweep on the connected Ray cluster; write best.yaml; return the table.

    `inputs` are the sweep's prepared inputs (see `prepare_threshold`, `prepare_patches`). Raises
    `SweepIncomplete` when trials errored or were interrupted: the same call again resumes them.
    """
    import ray
    from mlflow import MlflowClient
    from ray import tune

    if settings.body_part not in config.patches.body_parts:
        raise ConfigError(f"unknown body part {settings.body_part!r}")
    uri = tracking.configure(config.tracking)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    critic_fields = asdict(critic) if critic is not None else None
    name = f"{settings.kind}-{_fingerprint(settings, config, inputs, critic_fields)}"
    tune_root = storage.join(run_uri, "tune")
    sweep_uri = storage.join(tune_root, name)
    experiment = f"boneaug/{settings.body_part}/tune_{settings.kind}"
    experiment_id = tracking.ensure_experiment(experiment)
    parent_id, resumed_run = _parent_run(
        client, experiment_id, storage.join(sweep_uri, "sweep.json"), name,
        {"sweep": settings.describe(), "sweep_uri": sweep_uri, "inputs": dict(inputs),
         "config": config.model_dump(mode="json")})

    cluster = ray.cluster_resources()
    concurrent = settings.max_concurrent or max_concurrent(config.compute, cluster)
    context = TrialContext(
        kind=settings.kind, body_part=settings.body_part, config=config.model_dump(mode="json"),
        data_uri=data_uri, run_uri=run_uri, sweep_uri=sweep_uri, sweep_name=name,
        experiment=experiment,
        parent_run_id=parent_id, tracking_uri=uri, inputs=dict(inputs),
        critic=critic_fields,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    trial_resources(cluster))
    fs, path = storage.pyarrow_filesystem(tune_root)
    experiment_path = f"{path.rstrip('/')}/{name}"
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    print(f"[tune] {settings.kind} sweep {name}: "
          f"{'resuming' if resumed else 'starting'} under {sweep_uri}; "
          f"up to {concurrent} trial(s) at once; MLflow {experiment} run {parent_id}", flush=True)
    if resumed:  # settings as first given (the concurrency limit too): Tune restores them
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = _new_tuner(settings, config, trainable, name=name, storage_path=path, filesystem=fs,
                           concurrent=concurrent)
    grid = tuner.fit()
    rows = _rows(settings.kind, grid)
    _close_child_runs(client, experiment_id, parent_id, rows)
    markdown = render_table(settings.kind, rows)
    _write_results(client, parent_id, sweep_uri, rows, markdown)
    unfinished = [r for r in rows if r["status"] in ("error", "unfinished")]
    if unfinished:
        client.set_terminated(parent_id, status="FAILED")
        raise SweepIncomplete(
            f"{len(unfinished)} of {len(rows)} trials of sweep {name} did not finish "
            f"({', '.join(r['trial_id'] + ': ' + r['status'] for r in unfinished)}). "
            f"Their errors are in {sweep_uri}/<trial dir>/error.txt and the trials' MLflow runs; "
            "run the same command again to resume (finished trials are kept, the others "
            "continue from their checkpoints)."
        )
    best = choose_best(rows, settings.metric)
    tuned = apply_params(config, settings.kind, settings.body_part,
                         {k: best[k] for k in _param_names(settings.kind, rows)})
    best_uri = write_best_config(tuned, storage.join(sweep_uri, "best.yaml"),
                                 note=f"{settings.kind} sweep {name}: trial {best['trial_id']}, "
                                      f"{settings.metric} {best[settings.metric]:.4f}")
    _finish_parent(client, parent_id, settings, best, best_uri)
    print(f"[tune] best {settings.metric} {best[settings.metric]:.4f} at "
          f"{ {k: best[k] for k in _param_names(settings.kind, rows)} }; config {best_uri}",
          flush=True)
    return SweepResult(kind=settings.kind, body_part=settings.body_part, sweep_uri=sweep_uri,
                       experiment=experiment, parent_run_id=parent_id, rows=rows, best=best,
                       best_config_uri=best_uri, markdown=markdown, resumed=resumed or resumed_run)


def _rows(kind: SweepKind, grid: Any) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid (last reported metrics)."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or Path(result.path).name}
        row.update({k: v for k, v in (result.config or {}).items()})
        keep = (("augmented_samples", "val_auc", "test_auc") if kind == "threshold"
                else ("iteration", *QUALITY_KEYS, "objective"))
        row.update({k: metrics.get(k) for k in keep})
        row["mlflow_run_id"] = metrics.get("mlflow_run_id")
        row["model_uri"] = metrics.get("model_uri")
        if result.error is not None:
            row["status"] = "error"
        elif metrics.get("final"):
            row["status"] = "done"
        elif metrics:
            row["status"] = "stopped early"  # ASHA
        else:
            row["status"] = "unfinished"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def choose_best(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """The finished trial with the highest `metric` (trials ASHA stopped early do not compete:
    their last value is an early, noisier one). Ties go to the first trial."""
    done = [r for r in rows if r["status"] == "done" and _finite(r.get(metric))]
    if not done:
        raise SweepIncomplete(f"no trial finished with a finite {metric}: nothing to choose from")
    return dict(max(done, key=lambda r: r[metric]))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def render_table(kind: SweepKind, rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as a markdown table; the chosen trial is marked."""
    params = _param_names(kind, rows)
    metric = "val_auc" if kind == "threshold" else "objective"
    metrics = (["augmented_samples", "val_auc", "test_auc"] if kind == "threshold"
               else ["iteration", *QUALITY_KEYS, "objective"])
    try:
        best_id = choose_best(rows, metric)["trial_id"]
    except SweepIncomplete:
        best_id = None
    head = ["trial", *params, *metrics, "status", "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial_id"], *(_fmt(r.get(k)) for k in params),
                 *(_fmt(r.get(k)) for k in metrics),
                 r["status"], "**yes**" if r["trial_id"] == best_id else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def write_best_config(config: BoneaugConfig, uri: str, *, note: str = "") -> str:
    """A profile YAML that `load_config(path=...)` (and every job's --config) reads back to
    `config`."""
    header = "".join(f"# {line}\n"
                     for line in ("boneaug configuration chosen by a Ray Tune sweep", note) if line)
    storage.write_text(uri, header + dump_config(config))
    return uri


def _write_results(client: Any, parent_id: str, sweep_uri: str, rows: Sequence[Mapping[str, Any]],
                   markdown: str) -> None:
    storage.write_text(storage.join(sweep_uri, "results.json"),
                       json.dumps(list(rows), indent=2, default=str))
    storage.write_text(storage.join(sweep_uri, "results.md"), markdown + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.md").write_text(markdown + "\n")
        (Path(tmp) / "results.json").write_text(json.dumps(list(rows), indent=2, default=str))
        client.log_artifact(parent_id, str(Path(tmp) / "results.md"))
        client.log_artifact(parent_id, str(Path(tmp) / "results.json"))


def _finish_parent(client: Any, parent_id: str, settings: SweepSettings, best: Mapping[str, Any],
                   best_uri: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    names = (["val_auc", "test_auc", "augmented_samples"] if settings.kind == "threshold"
             else ["objective", *QUALITY_KEYS])
    metrics = [Metric(f"best/{k}", float(best[k]), now, 0) for k in names if _finite(best.get(k))]
    metrics += [Metric(f"best/{k}", float(best[k]), now, 0)
                for k in settings.space if _finite(best.get(k))]
    client.log_batch(parent_id, metrics=metrics)
    client.set_tag(parent_id, "best_trial_id", best["trial_id"])
    client.set_tag(parent_id, "best_config_uri", best_uri)
    if best.get("mlflow_run_id"):
        client.set_tag(parent_id, "best_trial_run_id", best["mlflow_run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "best.yaml").write_text(storage.read_bytes(best_uri).decode())
        client.log_artifact(parent_id, str(Path(tmp) / "best.yaml"))
    client.set_terminated(parent_id, status="FINISHED")


def _close_child_runs(client: Any, experiment_id: str, parent_id: str,
                      rows: Sequence[Mapping[str, Any]]) -> None:
    """Trials that ASHA stopped end as KILLED (their trainer may have marked them FAILED when its
    Train run was taken down), tagged ``boneaug.stopped_by=ASHA``; runs of trials that died
    without a word (still RUNNING) end as KILLED too."""
    stopped = {r["mlflow_run_id"] for r in rows
               if r["status"] == "stopped early" and r.get("mlflow_run_id")}
    for run in client.search_runs([experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        if run.info.run_id in stopped:
            client.set_tag(run.info.run_id, "boneaug.stopped_by", "ASHA")
            client.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")


def child_runs(parent_run_id: str, *, tracking_config: TrackingConfig | None = None) -> list[Any]:
    """The MLflow runs of a sweep's trials (nested under its parent run)."""
    from mlflow import MlflowClient

    uri = tracking.configure(tracking_config)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    return list(client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"))


# ---- the trial -----------------------------------------------------------------------------
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
    _log_params(client, run.info.run_id, {"tune": dict(params)})
    return run.info.run_id


@contextlib.contextmanager
def _as_mlflow_run(run_id: str) -> Iterator[None]:
    """The next ``mlflow.start_run`` in this process (fit_*'s) resumes `run_id` (MLflow's
    documented ``MLFLOW_RUN_ID``), so the trainer logs into the trial's nested run."""
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)  # consumed by start_run, or unused (a finished run)


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
    from boneaug.train.classifier import ClassifierData, fit_classifier

    t = float(params["t"])
    selected = select_augmented(context.inputs["candidates"], t)
    splits = classification_splits(context.run_uri, augmented=selected,
                                   max_train_negatives=config.drn.max_train_negatives,
                                   seed=config.drn.seed)
    with _as_mlflow_run(run_id):
        result = fit_classifier(
            config.drn, ClassifierData(splits["train"], splits["val"], splits["test"]),
            publish=_trial_publish(context, storage.join(trial_uri, "drn"), trial_uri),
            workers=Workers.from_config(config, at_least=1),
            init_from=context.inputs.get("init_from"),
            image_size=(config.image.height, config.image.width),
        )
    metrics = {"augmented_samples": int(selected.num_rows), "val_auc": float(result.best_val_auc),
               "test_auc": auc_on_test(result.predictions_uri)}
    client = MlflowClient(tracking_uri=context.tracking_uri)
    _check_nested(client, context, run_id, result.mlflow_run_id)
    client.log_batch(run_id, metrics=_metrics({f"tune/{k}": v for k, v in metrics.items()}))
    client.set_tag(run_id, "model_uri", result.model_uri)
    return {**metrics, "model_uri": result.model_uri}


def _trial_publish(context: TrialContext, run_uri: str, trial_uri: str) -> Publish:
    """Where a trial's trainer writes: the trial's folder, the sweep's experiment, no registry."""
    return Publish(run_uri, context.experiment,
                   run_name=f"{context.sweep_name}-{Path(trial_uri).name}",
                   tracking=TrackingConfig(tracking_uri=context.tracking_uri))


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


def _metrics(values: Mapping[str, Any], step: int = 0) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]


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
        with _as_mlflow_run(run_id):
            return fit_unit(
                config.unit, data["lesion"], data["normal"],
                publish=_trial_publish(context, trial_uri, trial_uri),
                workers=Workers.from_config(config, at_least=1),
                quality_sets=quality, critic_config=critic,
            )

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


# ---- inputs: the workflow stages a sweep stands on -----------------------------------------
def prepare_threshold(config: BoneaugConfig, body_part: str, *, data_uri: str, out_uri: str,
                      run_uri: str, synthesize: bool) -> dict[str, Any]:
    """Cohort, ingest, fracture pre-training, baseline DRN, UNIT and the blended, scored candidates,
    as the augment jobs make them (the same workflow stages, reused when done); returns
    {"candidates", "init_from", "baseline_val_auc", "unit", "scorer"}.

    The stages are `workflow.run_body_part`'s own, so a sweep and an augment job of the same run
    share (reuse) each other's work.
    """
    from boneaug import workflow as wf

    wf.ensure_cohort(config, data_uri, [body_part], synthesize=synthesize)
    wf.ingest_stage(config, data_uri, run_uri, body_part)
    fracture = wf.fracture_model(config, data_uri, out_uri)
    baseline = wf.baseline_stage(config, run_uri, body_part, fracture)
    unit_uri = wf.unit_model(config, data_uri, run_uri, body_part)
    candidates = wf.candidates_stage(config, data_uri, run_uri, wf.OWN.key, unit_uri,
                                     baseline["model"])
    return {"candidates": candidates["candidates"], "init_from": fracture,
            "baseline_val_auc": baseline["val_auc"], "unit": unit_uri, "scorer": baseline["model"]}


def prepare_patches(config: BoneaugConfig, body_part: str, *, data_uri: str, run_uri: str,
                    synthesize: bool) -> dict[str, Any]:
    """Cohort, ingest and the base patch sets (the profile's s and n; workflow stages, reused when
    done); returns {"patches": <run>/patches}. The UNIT sweep trains on these; the patch sweep
    trains its quality critic on them."""
    from boneaug import workflow as wf

    wf.ensure_cohort(config, data_uri, [body_part], synthesize=synthesize, fractures=False)
    wf.ingest_stage(config, data_uri, run_uri, body_part)
    wf.patches_stage(config, data_uri, run_uri, body_part)
    return {"patches": storage.join(run_uri, "patches")}


__all__ = [
    "KINDS", "Param", "QualityWatcher", "SweepIncomplete", "SweepResult", "SweepSettings",
    "TrialContext", "apply_params", "child_runs", "choose_best", "make_trial_patches",
    "max_concurrent", "optuna_searcher", "patches_space", "prepare_patches", "prepare_threshold",
    "quality_objective", "render_table", "run_and_print", "run_reporting", "run_sweep",
    "run_trial", "auc_on_test", "threshold_space", "trial_resources", "unit_space",
    "write_best_config",
]


# ---- the jobs' shared command line ---------------------------------------------------------
def add_sweep_arguments(parser: Any) -> None:
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once "
                             "(default: cluster CPUs (GPUs) / one trial's Train workers)")
    parser.add_argument("--max-failures", type=int, default=1,
                        help="Tune retries per trial; each retry resumes the trial's Train run "
                             "(default 1)")
    parser.add_argument("--seed", type=int, default=0, help="search seed (default 0)")


def run_and_print(config: BoneaugConfig, settings: SweepSettings, *, data_uri: str, run_uri: str,
                  inputs: Mapping[str, Any], **extra: Any) -> SweepResult:
    """A job's sweep: run (or resume) it and print its table; an incomplete sweep exits 1 with
    what to do."""
    import sys

    try:
        result = run_sweep(config, settings, data_uri=data_uri, run_uri=run_uri, inputs=inputs)
    except SweepIncomplete as exc:
        sys.exit(f"sweep incomplete: {exc}")
    print_result(result, **extra)
    return result


def print_result(result: SweepResult, **extra: Any) -> None:
    print(f"\n{result.kind} sweep for {result.body_part}{' (resumed)' if result.resumed else ''}\n")
    print(result.markdown)
    for key, value in extra.items():
        print(f"{key}: {value}")
    print(f"chosen: {result.best_params} "
          f"({'val_auc' if result.kind == 'threshold' else 'objective'} "
          f"{result.best['val_auc' if result.kind == 'threshold' else 'objective']:.4f})")
    print(f"best config: {result.best_config_uri}  (use it: --config <a local copy of it>)")
    print(f"tune experiment: {result.sweep_uri}")
    print(f"mlflow: {tracking.tracking_uri()} experiment {result.experiment}, "
          f"parent run {result.parent_run_id}")
