"""Ray Tune sweeps over the paper's hyper-parameters, tracked in MLflow.

Three sweeps, one per job (``jobs/tune_threshold.py``, ``jobs/tune_patches.py``,
``jobs/tune_unit.py``):

- ``threshold`` (SPEC 5): a grid over the pseudo-label threshold t. The blended candidates are
  made once (workflow stages); each trial selects by t and trains an augmented DRN. Objective:
  validation AUC (``val_auc``); the test AUC is recorded, never used to choose.
- ``patches`` (SPEC 2): s in {1, 2} x n over a range. Each trial re-makes the patch sets under its
  own prefix and trains UNIT on them. Objective: the translator quality signal (below). ASHA.
- ``unit`` (SPEC 3): lambda0..lambda4 log-uniform around their defaults and Adam's lr, OptunaSearch
  (TPE, seeded). Objective and ASHA as above.

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
or per-iteration metrics and model into (``Publish.mlflow_run_id``), plus the trial's tuned
params (``tune.*``) and final metrics.

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

Modules: `spaces` (the search spaces, `KIND`: what each kind tunes and measures, and how a trial's
values enter the config), `sweep` (the driver, resources, results, best.yaml, the jobs' command
line), `trials` (one trial in its Tune process).
"""

from boneaug.errors import SweepIncomplete
from boneaug.tune.spaces import (
    KIND,
    KINDS,
    Param,
    SweepKind,
    apply_params,
    patches_space,
    quality_objective,
    threshold_space,
    unit_space,
)
from boneaug.tune.sweep import (
    SweepResult,
    SweepSettings,
    add_sweep_arguments,
    child_runs,
    choose_best,
    max_concurrent,
    optuna_searcher,
    prepare_patches,
    prepare_threshold,
    print_result,
    render_table,
    run_and_print,
    run_sweep,
    trial_resources,
    write_best_config,
)
from boneaug.tune.trials import (
    QualityWatcher,
    TrialContext,
    auc_on_test,
    make_trial_patches,
    run_reporting,
    run_trial,
)

__all__ = [
    "KIND", "KINDS", "Param", "QualityWatcher", "SweepIncomplete", "SweepKind", "SweepResult",
    "SweepSettings", "TrialContext", "add_sweep_arguments", "apply_params", "auc_on_test",
    "child_runs", "choose_best", "make_trial_patches", "max_concurrent", "optuna_searcher",
    "patches_space", "prepare_patches", "prepare_threshold", "print_result", "quality_objective",
    "render_table", "run_and_print", "run_reporting", "run_sweep", "run_trial", "threshold_space",
    "trial_resources", "unit_space", "write_best_config",
]
