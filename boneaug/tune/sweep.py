"""The sweep driver: Tune's experiment (new or restored), its parent MLflow run, resources per
trial, the results table, best.yaml, and the jobs' shared command line."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from boneaug import storage, tracking
from boneaug.config import BoneaugConfig, ComputeConfig, TrackingConfig, dump_config
from boneaug.errors import ConfigError, SweepIncomplete
from boneaug.tune.spaces import KIND, Space, SweepKind, apply_params
from boneaug.tune.trials import TrialContext, finite, log_params, run_trial

if TYPE_CHECKING:
    from boneaug.eval.quality import CriticConfig

log = logging.getLogger(__name__)
TRIAL_CPUS = 0.01  # a trial only drives its Ray Train run, whose workers request their own CPUs


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


# ---- settings and results ----------------------------------------------------------------
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
        return KIND[self.kind].metric

    def describe(self) -> dict[str, Any]:
        """What identifies the sweep (the fingerprint's input; also the parent run's params)."""
        return {"kind": self.kind, "body_part": self.body_part,
                "space": {k: v.describe() for k, v in sorted(self.space.items())},
                "num_samples": self.num_samples, "search": self.search, "scheduler": self.scheduler,
                "asha_grace": self.asha_grace, "asha_reduction": self.asha_reduction,
                "seed": self.seed}


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
    return [k for k in KIND[kind].params if any(k in r for r in rows)]


# ---- the driver ----------------------------------------------------------------------------
def _fingerprint(settings: SweepSettings, config: BoneaugConfig, inputs: Mapping[str, Any],
                 critic: Mapping[str, Any] | None) -> str:
    blob = json.dumps({"settings": settings.describe(), "config": config.model_dump(mode="json"),
                       "inputs": dict(inputs), "critic": critic}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


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
    log_params(client, run.info.run_id, params)
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
        return optuna_searcher(settings)
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=settings.seed)


def optuna_searcher(settings: SweepSettings) -> Any:
    """Optuna's TPE over `settings.space` (seeded; optuna is a pinned dependency)."""
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
    `inputs`: see `prepare_threshold`, `prepare_patches`. Raises `SweepIncomplete` when trials
    errored or were interrupted: the same call again resumes them."""
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
        experiment=experiment, parent_run_id=parent_id, tracking_uri=uri, inputs=dict(inputs),
        critic=critic_fields)
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
    rows = _rows(settings.kind, tuner.fit())
    _close_child_runs(client, experiment_id, parent_id, rows)
    markdown = render_table(settings.kind, rows)
    _write_results(client, parent_id, sweep_uri, rows, markdown)
    best, best_uri = _choose(client, config, settings, rows, name=name, sweep_uri=sweep_uri,
                             parent_id=parent_id)
    return SweepResult(kind=settings.kind, body_part=settings.body_part, sweep_uri=sweep_uri,
                       experiment=experiment, parent_run_id=parent_id, rows=rows, best=best,
                       best_config_uri=best_uri, markdown=markdown, resumed=resumed or resumed_run)


def _choose(client: Any, config: BoneaugConfig, settings: SweepSettings,
            rows: list[dict[str, Any]], *, name: str, sweep_uri: str,
            parent_id: str) -> tuple[dict[str, Any], str]:
    """The best trial and its best.yaml, the parent run finished; `SweepIncomplete` (parent
    FAILED) when a trial did not finish."""
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
    params = {k: best[k] for k in _param_names(settings.kind, rows)}
    tuned = apply_params(config, settings.kind, settings.body_part, params)
    best_uri = write_best_config(tuned, storage.join(sweep_uri, "best.yaml"),
                                 note=f"{settings.kind} sweep {name}: trial {best['trial_id']}, "
                                      f"{settings.metric} {best[settings.metric]:.4f}")
    _finish_parent(client, parent_id, settings, best, best_uri)
    print(f"[tune] best {settings.metric} {best[settings.metric]:.4f} at {params}; "
          f"config {best_uri}", flush=True)
    return best, best_uri


def _rows(kind: SweepKind, grid: Any) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid (last reported metrics)."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or Path(result.path).name}
        row.update({k: v for k, v in (result.config or {}).items()})
        row.update({k: metrics.get(k) for k in KIND[kind].metrics})
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
    done = [r for r in rows if r["status"] == "done" and finite(r.get(metric))]
    if not done:
        raise SweepIncomplete(f"no trial finished with a finite {metric}: nothing to choose from")
    return dict(max(done, key=lambda r: r[metric]))


def render_table(kind: SweepKind, rows: Sequence[Mapping[str, Any]]) -> str:
    """The results as a markdown table; the chosen trial is marked."""
    params, metrics = _param_names(kind, rows), KIND[kind].metrics
    try:
        best_id = choose_best(rows, KIND[kind].metric)["trial_id"]
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
    names = [k for k in KIND[settings.kind].metrics if k != "iteration"] + list(settings.space)
    metrics = [Metric(f"best/{k}", float(best[k]), now, 0) for k in names if finite(best.get(k))]
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
    metric = KIND[result.kind].metric
    print(f"chosen: {result.best_params} ({metric} {result.best[metric]:.4f})")
    print(f"best config: {result.best_config_uri}  (use it: --config <a local copy of it>)")
    print(f"tune experiment: {result.sweep_uri}")
    print(f"mlflow: {tracking.tracking_uri()} experiment {result.experiment}, "
          f"parent run {result.parent_run_id}")


__all__ = [
    "SweepResult", "SweepSettings", "TRIAL_CPUS", "add_sweep_arguments", "child_runs",
    "choose_best", "max_concurrent", "optuna_searcher", "prepare_patches", "prepare_threshold",
    "print_result", "render_table", "run_and_print", "run_sweep", "trial_resources",
    "write_best_config",
]
