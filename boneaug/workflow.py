"""The whole chain for one body part (paper sections 3-4), with stage reuse.

    cohort -> ingest -> patches -> fracture pre-training
           -> per variant: translate (UNIT, another body part's UNIT: TL_G, copy-paste, oracle)
              + blend, once
           -> per training seed: baseline DRN, learning curve (a share / a multiple of the real
              positives), and per variant: score (that seed's baseline, or another body part's:
              TL_PL) -> augmented DRN per t of the grid -> t chosen on validation AUC
           -> paired bootstrap against the same seed's baseline on test -> report (mean +- sd
              over seeds) + registry aliases (first seed)

Every stage records what it produced under <run>/stages/<name>.json with a fingerprint of its
inputs and settings; a stage whose fingerprint matches is reused, not recomputed, so re-running a
job after a crash or a change resumes where the inputs changed. Ray does the heavy lifting inside
each stage (Ray Data, Ray Train); this module sequences them, and runs the classifier trainings
that do not depend on each other side by side as Ray tasks (`train_stages`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from boneaug import storage, tracking
from boneaug.augment.arms import Arm, TranslatorSpec
from boneaug.config import BodyPart, BoneaugConfig
from boneaug.errors import DataError
from boneaug.train.distributed import Publish, Workers

log = logging.getLogger(__name__)


_KNOWN: set[tuple[str, str]] = set()
"""(stage URI, fingerprint) made or announced as reused by this process: a stage that later
stages read again (patches, UNIT, a baseline) is announced once, not at every read."""


def _fingerprint(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage(run_uri: str, name: str, inputs: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` unless <run>/stages/<name>.json holds a result for the same `inputs`.

    The result carries `made_from`, the fingerprint of those inputs: a later stage whose inputs
    hold this result then reruns when this one was remade, even where the remade result reads
    the same (a re-blend writes as many candidates to the same URI; before, the scores and the
    DRNs of the old blends were reused after a new UNIT)."""
    fingerprint = _fingerprint(inputs)
    done = _reused(run_uri, name, fingerprint)
    return done if done is not None else _run(run_uri, name, fingerprint, fn)


def _run(run_uri: str, name: str, fingerprint: str,
         fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[{name}] running ...", flush=True)
    start = time.perf_counter()
    return _record(run_uri, name, fingerprint, fn(), start)


def _stage_uri(run_uri: str, name: str) -> str:
    return storage.join(run_uri, "stages", f"{name}.json")


def _reused(run_uri: str, name: str, fingerprint: str) -> dict[str, Any] | None:
    """The stored result of stage `name` when it was made from inputs of this `fingerprint`."""
    uri = _stage_uri(run_uri, name)
    if storage.exists(uri):
        done = json.loads(storage.read_bytes(uri))
        if done.get("fingerprint") == fingerprint:
            if (uri, fingerprint) not in _KNOWN:
                _KNOWN.add((uri, fingerprint))
                print(f"[{name}] reused ({uri})", flush=True)
            return dict(done["result"])
    return None


def _record(run_uri: str, name: str, fingerprint: str, result: dict[str, Any],
            start: float) -> dict[str, Any]:
    """Store stage `name`'s `result` (begun at perf_counter `start`) and return it."""
    result = result | {"made_from": fingerprint}
    seconds = time.perf_counter() - start
    uri = _stage_uri(run_uri, name)
    storage.write_text(uri, json.dumps(
        {"fingerprint": fingerprint, "seconds": seconds, "result": result}, indent=2,
        default=str))
    _KNOWN.add((uri, fingerprint))
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return result


@dataclass(frozen=True)
class Training:
    """One training of the chain (a classifier's, or a translator's) as a stage: its name, the
    inputs that decide its reuse, and the training itself under a config (`train_stages` hands
    it one with fewer threads when it trains beside others)."""

    name: str
    inputs: Any
    train: Callable[[BoneaugConfig], dict[str, Any]]


@dataclass(frozen=True)
class Later:
    """Trainings that can only be named once others have trained (an arm's DRNs need its seed's
    baseline to pseudo-label their candidates, a later seed's arm the t the first seed chose):
    `make`, called on the driver with the results so far once every training named in `after`
    is done, returns them (and further `Later`s)."""

    after: tuple[str, ...]
    make: Callable[[Mapping[str, dict[str, Any]]], Sequence[Training | Later]]


def train_stages(config: BoneaugConfig, run: str,
                 trainings: Sequence[Training | Later]) -> dict[str, dict[str, Any]]:
    """`trainings` as stages (reused when done before), each as soon as what it needs has
    trained; returns name -> result of every training made.

    In Train's local mode (compute.num_workers 0) up to compute.concurrent_trainings of them
    train at once, each in its own Ray task with an equal share of compute.torch_threads: the
    local DRN's small convolutions use a second core poorly (a step takes 0.222 s on one thread,
    0.196 s on two), so two one-thread trainings side by side finish far sooner than the same
    two one after the other, and a `Later` is made the moment its trainings are done, so that
    no slot waits while something could train. With Train workers each training spreads over
    the workers instead, one after the other, in the order they become ready.
    """
    results: dict[str, dict[str, Any]] = {}
    queue: list[tuple[Training, str]] = []  # with its fingerprint
    waiting: list[Later] = []

    def add(items: Sequence[Training | Later]) -> None:
        for item in items:
            if isinstance(item, Later):
                waiting.append(item)
                continue
            fingerprint = _fingerprint(item.inputs)
            done = _reused(run, item.name, fingerprint)
            if done is None:
                queue.append((item, fingerprint))
            else:
                results[item.name] = done

    def release() -> None:
        """Make every `Later` whose trainings are all done (theirs may release more)."""
        while ready := [later for later in waiting if all(n in results for n in later.after)]:
            for later in ready:
                waiting.remove(later)
                add(later.make(results))

    add(trainings)
    release()
    compute = config.compute
    slots = compute.concurrent_trainings if compute.num_workers == 0 else 1
    if slots > 1 and (len(queue) > 1 or waiting):
        _train_side_by_side(config, run, queue, release, results, slots)
    else:
        while queue:
            training, fingerprint = queue.pop(0)
            results[training.name] = _run(run, training.name, fingerprint,
                                          partial(training.train, config))
            release()
    if waiting:
        missing = sorted({n for later in waiting for n in later.after} - set(results))
        raise RuntimeError(f"trainings wait for {missing}, which nothing trains: a plan names a "
                           f"training that is not among its trainings")
    return results


def _train_side_by_side(config: BoneaugConfig, run: str, queue: list[tuple[Training, str]],
                        release: Callable[[], None], results: dict[str, dict[str, Any]],
                        slots: int) -> None:
    """The trainings of `queue` as Ray tasks, `slots` at a time, each with its share of the
    threads, into `results`; `release` queues what a finished training lets train. The tasks
    hold no CPU of Ray's: the Ray Data tasks that feed them need the cluster's CPUs (as
    `worker_resources` keeps one for them), and `slots` bounds how many train at once."""
    import ray

    threads = max(1, (config.compute.torch_threads or slots) // slots)
    shared = config.model_copy(update={
        "compute": config.compute.model_copy(update={"torch_threads": threads})})
    tracking.open_store(config.tracking)
    task = ray.remote(num_cpus=0, max_retries=0)(_train_in_task)
    running: dict[Any, tuple[str, str, float]] = {}

    def fill() -> None:
        while queue and len(running) < slots:
            training, fingerprint = queue.pop(0)
            print(f"[{training.name}] running ({slots} trainings side by side, {threads} "
                  f"thread(s) each) ...", flush=True)
            running[task.remote(training.train, shared)] = (training.name, fingerprint,
                                                            time.perf_counter())

    try:
        while queue or running:
            fill()
            [ready], _ = ray.wait(list(running), num_returns=1)
            name, fingerprint, start = running.pop(ready)
            results[name] = _record(run, name, fingerprint, ray.get(ready), start)
            fill()  # before making what this one released: a blend can take minutes
            release()
    finally:  # a failed training (or plan) stops the others: its error is what the job reports
        for ref in running:
            ray.cancel(ref, force=True)


def _train_in_task(train: Callable[[BoneaugConfig], dict[str, Any]],
                   config: BoneaugConfig) -> dict[str, Any]:
    """One training inside a Ray task, logging its epochs as the driver would."""
    from boneaug.progress import LOG_FORMAT, quiet_ray

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_ray()
    tracking.configure(config.tracking)
    return train(config)


@dataclass(frozen=True)
class Variant:
    """One augmented row of a table: whose generator, whose pseudo-labeller."""

    key: str  # file-name safe, e.g. "aug", "tl_g", "tl_g_pl"
    type: str  # the paper's "Type" column
    arm: Arm = "unit"  # what makes the lesion patches (boneaug.augment.arms)
    unit_from: BodyPart | None = None  # unit arm: None = this body part's own UNIT
    scorer_from: BodyPart | None = None  # None: this body part's own baseline

    @property
    def own_unit(self) -> bool:
        """Whether this body part's own UNIT (trained in its chain) makes the lesion patches."""
        return self.arm == "unit" and self.unit_from is None


OWN = Variant("aug", "Augmented")
COPY_PASTE = Variant("copy_paste", "Copy-paste", arm="copy_paste")
ORACLE = Variant("oracle", "Oracle", arm="oracle")
ARMS = {"unit": OWN, "copy_paste": COPY_PASTE, "oracle": ORACLE}  # a job's --arms


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What one body part's chain trains beside its baseline.

    variants: the augmented arms; thresholds: the t grid (None: the config's); grids: a
    variant's own grid instead, by key (e.g. the one t its humerus counterpart chose); seeds: the
    training seeds (None: the config's); learning_curve: multiples of the real training
    positives (e.g. 0.25, 0.5, 2, 4) the baseline is retrained on.
    """

    variants: tuple[Variant, ...] = (OWN,)
    thresholds: tuple[float, ...] | None = None
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None
    learning_curve: tuple[float, ...] = ()


@dataclass
class BodyPartResult:
    body_part: str
    run_uri: str
    report_uri: str
    markdown: str
    chosen: dict[str, float] = field(default_factory=dict)  # variant key -> t
    models: dict[str, str] = field(default_factory=dict)  # role -> models:/name/version
    figures: dict[str, str] = field(default_factory=dict)  # variant key -> Figure 3 PNG URI
    baselines: dict[int, str] = field(default_factory=dict)  # training seed -> baseline URI


def ensure_cohort(config: BoneaugConfig, data_uri: str, body_parts: list[str], *,
                  synthesize: bool, fractures: bool = True) -> None:
    """Make sure `data_uri` holds annotated DICOMs of `body_parts`, and the fracture corpus
    when `fractures` (only the DRN stages need it, to pre-train)."""
    from boneaug.synth.cohort import generate_cohort, generated_with, read_record

    ann_uri = storage.join(data_uri, "annotations.parquet")
    have: set[str] = set()
    if storage.exists(ann_uri):
        table = storage.read_parquet(ann_uri, columns=["body_part", "task"])
        tasks = table.column("task").to_pylist()
        # fracture-corpus rows carry body parts too: only lesion-task rows make a body part
        # present
        have = {part
                for part, task in zip(table.column("body_part").to_pylist(), tasks, strict=True)
                if task != "fracture"}
        if "fracture" in tasks:
            have.add("fracture")
    wanted = [*body_parts, "fracture"] if fractures else list(body_parts)
    stale = [p for p in wanted
             if p in have and p in read_record(data_uri)
             and not generated_with(data_uri, p, config.synth, seed=config.synth.seed)]
    if stale and synthesize:  # our own cohort, made with other synth settings: make it anew
        print(f"[cohort] {stale} were generated with other synth settings: regenerating",
              flush=True)
        have -= set(stale)
    missing = [p for p in body_parts if p not in have]
    needs_fractures = fractures and "fracture" not in have
    if not missing and not needs_fractures:
        return
    if not synthesize:
        absent = [*missing, *(["the fracture corpus (task 'fracture', for DRN pre-training)"]
                              if needs_fractures else [])]
        raise DataError(f"{ann_uri} has no rows for {', '.join(absent)}; point --data at a "
                        "cohort that has them (`boneaug synth --fractures` writes a synthetic "
                        "fracture corpus beside yours), or omit --data for the synthetic one")
    print(f"[cohort] synthesising {missing} (+ fracture corpus: {needs_fractures}) "
          f"into {data_uri}", flush=True)
    generate_cohort(config.synth, missing, data_uri, seed=config.synth.seed,
                    fractures=needs_fractures)


def ingest_stage(config: BoneaugConfig, data: str, run: str, prefix_part: str) -> dict[str, Any]:
    from boneaug.data.ingest import ingest

    def go() -> dict[str, Any]:
        summary = ingest(data_uri=data, run_uri=run, image=config.image,
                         descriptor_rows=config.patches.descriptor_size, body_part=prefix_part)
        print(summary, flush=True)
        return {"written": summary.written, "rejected": summary.rejected}

    return stage(run, "ingest", [data, config.image, config.patches.descriptor_size], go)


def fracture_model(config: BoneaugConfig, data: str, out: str) -> str:
    """The auxiliary fracture-detection DRN (paper 4.2), shared by every body part of a profile."""
    from boneaug.data.datasets import image_table
    from boneaug.train.classifier import FRACTURE_MODEL, pretrain_fracture, pretraining_config

    run = storage.join(out, "runs", f"fracture-{config.profile}")
    ingest_stage(config, data, run, "fracture")

    def go() -> dict[str, Any]:
        import ray.data

        table = image_table(run, task="fracture", classification=False)
        result = pretrain_fracture(
            config.drn, ray.data.from_arrow(table),
            publish=Publish(storage.join(run, "drn"), "boneaug/fracture/pretrain",
                            registered_name=FRACTURE_MODEL, tracking=config.tracking,
                            overwrite=True),
            workers=Workers.from_config(config),
            image_size=(config.image.height, config.image.width),
        )
        return {"model": f"models:/{FRACTURE_MODEL}/{result.model_version}",
                "val_auc": result.best_val_auc}

    pretraining = pretraining_config(config.drn).model_dump(exclude={"epochs", "finetune_blocks"})
    return stage(run, "fracture", [pretraining, config.image, config.compute.num_workers],
                 go)["model"]


def drn_publish(run: str, name: str, experiment: str,
                registered_name: str | None = None) -> Publish:
    """Where a DRN of this run goes: ``<run>/<name>``, `experiment`, `registered_name` (None:
    logged to MLflow only)."""
    return Publish(storage.join(run, name), experiment, registered_name=registered_name)


def train_drn(config: BoneaugConfig, run: str, publish: Publish, *, augmented: Any,
              init_from: str, seed: int | None = None, positives: float = 1.0) -> dict[str, Any]:
    """Fine-tune one DRN at training seed `seed` (default: the config's) on the real training
    rows and `augmented`, and publish it; `positives` < 1 keeps that share of the real training
    positives, > 1 adds extra ones from the cohort's "extra" split (the learning curve). The
    stages decide reuse: the trainer always trains (``overwrite``), logging to the config's
    MLflow."""
    from boneaug.data.datasets import classification_splits
    from boneaug.train.classifier import ClassifierData, fit_classifier, step_matched

    drn = config.drn if seed is None else config.drn.model_copy(update={"seed": seed})
    real = train_positives(run) if positives != 1.0 else 0
    extra = round((positives - 1.0) * real) if positives > 1 else 0
    splits = classification_splits(run, augmented=augmented,
                                   max_train_negatives=drn.max_train_negatives,
                                   seed=drn.data_seed, positive_fraction=min(positives, 1.0),
                                   extra_positives=extra)
    rows = splits["train"].count()
    # the baseline's rows: these without the augmented rows, and with all the real positives
    # instead of a curve point's share of them or extra ones
    baseline_rows = rows - (0 if augmented is None else augmented.num_rows)
    if positives != 1.0:
        baseline_rows += real - curve_positives(real, positives)
    drn = step_matched(drn, rows=rows, baseline_rows=baseline_rows)
    result = fit_classifier(
        drn, ClassifierData(splits["train"], splits["val"], splits["test"]),
        publish=replace(publish, tracking=config.tracking, overwrite=True),
        workers=Workers.from_config(config), init_from=init_from,
        image_size=(config.image.height, config.image.width),
    )
    return {"model": result.model_uri, "version": result.model_version,
            "val_auc": result.best_val_auc, "predictions": result.predictions_uri,
            "train_losses": list(result.train_losses), "val_aucs": list(result.val_aucs),
            "kept_epoch": result.best_epoch}


def training_history(trained: dict[str, Any]) -> dict[str, Any]:
    """A `train_drn` result's per-epoch history, as `ModelMeta` fields for the report (none
    from a stage stored before the history was)."""
    return {"train_losses": trained.get("train_losses", ()),
            "val_aucs": trained.get("val_aucs", ()), "kept_epoch": trained.get("kept_epoch")}


def unit_model(config: BoneaugConfig, data: str, run: str, body_part: str) -> str:
    """This body part's UNIT (`unit_training`), trained or reused on its own."""
    return train_stages(config, run, [unit_training(config, data, run, body_part)])["unit"]["model"]


def unit_training(config: BoneaugConfig, data: str, run: str, body_part: str) -> Training:
    """This body part's UNIT, trained on its translation patch sets and registered, as a stage
    that can train beside the classifiers; the phantom critic's verdict on its translations is
    logged when one is registered (an instrument)."""
    patches = patches_stage(config, data, run, body_part)
    return Training("unit", [config.unit, patches, config.compute.num_workers],
                    partial(_train_unit, data=data, run=run, body_part=body_part))


def _train_unit(config: BoneaugConfig, *, data: str, run: str, body_part: str) -> dict[str, Any]:
    from boneaug.data.datasets import patch_dataset
    from boneaug.data.patch_sets import load_patch_array
    from boneaug.eval.phantom_critic import registered_critic
    from boneaug.eval.quality import QualitySets
    from boneaug.train.unit import fit_unit

    sets = {k: storage.join(run, "patches", k) for k in ("lesion", "normal", "source")}
    read = {k: patch_dataset(sets[k]) for k in ("lesion", "normal")}
    quality = QualitySets(lesion=load_patch_array(sets["lesion"]),
                          normal=load_patch_array(sets["normal"]),
                          source=load_patch_array(sets["source"]))
    result = fit_unit(
        config.unit, read["lesion"], read["normal"],
        publish=Publish(run, f"boneaug/{body_part}/train_unit",
                        registered_name=f"boneaug-unit-{body_part}", alias="challenger",
                        tracking=config.tracking, overwrite=True),
        workers=Workers.from_config(config, at_least=1), quality_sets=quality,
        instrument=None if (phantom := registered_critic(body_part)) is None
        else (phantom.model, phantom.threshold),
    )
    trust = ("" if result.critic_heldout_auc is None
             else f" (critic held-out AUC {result.critic_heldout_auc:.2f})")
    kid = ("" if result.kid_translated is None or result.kid_source is None
           else f"; KID to real lesion patches in its features {result.kid_translated:.4f} vs "
                f"untranslated {result.kid_source:.4f}")
    print(f"[unit] quality: translated sources called lesion {result.frac_translated:.2f} vs "
          f"untranslated {result.frac_source:.2f}{trust}{kid}", flush=True)
    if result.instrument:
        rates = result.instrument
        print(f"[unit] phantom critic (instrument): translated sources called lesion "
              f"{rates['translated']:.2f} vs untranslated {rates['source']:.2f}, real lesion "
              f"patches {rates['real_lesion']:.2f}", flush=True)
    return {"model": f"models:/boneaug-unit-{body_part}/{result.model_version}",
            "frac_translated": result.frac_translated, "frac_source": result.frac_source,
            "kid_translated": result.kid_translated, "kid_source": result.kid_source}


def patches_stage(config: BoneaugConfig, data: str, run: str, body_part: str) -> dict[str, Any]:
    from boneaug.data.patch_sets import make_patch_sets

    settings = config.patches.body_parts[body_part]  # type: ignore[index]

    def go() -> dict[str, Any]:
        summary = make_patch_sets(
            data_uri=data, run_uri=run, body_part=body_part, settings=settings,
            size=config.patches.size, min_mean_intensity=config.patches.min_mean_intensity,
            seed=config.patches.seed, max_source_images=config.augment.max_source_images,
        )
        print(summary, flush=True)
        return {"written": summary.written}

    return stage(run, "patches", [config.patches, config.augment.max_source_images], go)


def baseline_training(config: BoneaugConfig, run: str, body_part: str, fracture: str,
                      seed: int | None = None) -> Training:
    """The baseline DRN (no augmentation) at training seed `seed` (default: the config's),
    fine-tuned from the fracture model; registered as boneaug-drn-<body_part>."""
    seed = config.drn.seed if seed is None else seed
    publish = drn_publish(run, f"drn-baseline-s{seed}", f"boneaug/{body_part}/train_classifier",
                          f"boneaug-drn-{body_part}")
    return Training(f"baseline-s{seed}", [config.drn, config.image, fracture, seed],
                    lambda cfg: train_drn(cfg, run, publish, augmented=None, init_from=fracture,
                                          seed=seed))


def baseline_stage(config: BoneaugConfig, run: str, body_part: str, fracture: str,
                   seed: int | None = None) -> dict[str, Any]:
    """`baseline_training`, trained (or reused) on its own."""
    training = baseline_training(config, run, body_part, fracture, seed)
    return train_stages(config, run, [training])[training.name]


def translator_spec(config: BoneaugConfig, data: str, run: str, body_part: str,
                    variant: Variant) -> TranslatorSpec:
    """The translator of `variant`: this body part's UNIT (trained here when needed) or another
    body part's (TL_G), the copy-paste arm over this run's lesion patches, or the oracle."""
    from boneaug.augment.pipeline import ModelRef

    seed = config.augment.seed
    if variant.arm == "copy_paste":
        return TranslatorSpec("copy_paste", lesion_patches_uri=storage.join(run, "patches",
                                                                             "lesion"), seed=seed)
    if variant.arm == "oracle":
        return TranslatorSpec("oracle", synth=config.synth, seed=seed)
    uri = (unit_model(config, data, run, body_part) if variant.unit_from is None
           else f"models:/boneaug-unit-{variant.unit_from}@challenger")
    return TranslatorSpec("unit", model_uri=ModelRef.resolve(uri).uri, seed=seed)


def blend_stage(config: BoneaugConfig, data: str, run: str, key: str,
                translator: TranslatorSpec) -> dict[str, Any]:
    """One arm's blended, unscored candidates under <run>/augmented/<key>/blended (made once;
    every seed's pseudo-labeller scores them)."""
    from boneaug.augment.pipeline import blend_candidates

    out = storage.join(run, "augmented", key)
    inputs = [translator, config.augment.blend_n, config.augment.blend, config.image,
              storage.read_manifest(storage.join(run, "patches"))]

    def go() -> dict[str, Any]:
        count = blend_candidates(data_uri=data, run_uri=run, out_uri=out, translator=translator,
                                 image=config.image, n=config.augment.blend_n,
                                 mode=config.augment.blend, tracking=config.tracking)
        print(f"[blend-{key}] {count} candidates blended with {translator.label}", flush=True)
        return {"blended_uri": storage.join(out, "blended"), "blended": count}

    return stage(run, f"blend-{key}", inputs, go)


def score_stage(config: BoneaugConfig, run: str, key: str, blended: dict[str, Any],
                scorer_uri: str, seed: int) -> dict[str, Any]:
    """One arm's candidates scored by one seed's pseudo-labeller, under
    <run>/augmented/<key>/s<seed>; returns {"candidates": URI, "blended": count}."""
    from boneaug.augment.pipeline import score_candidates

    def go() -> dict[str, Any]:
        summary = score_candidates(blended_uri=blended["blended_uri"],
                                   out_uri=storage.join(run, "augmented", key, f"s{seed}"),
                                   scorer_uri=scorer_uri, tracking=config.tracking)
        print(summary, flush=True)
        return {"candidates": summary.candidates_uri, "blended": summary.blended}

    return stage(run, f"score-{key}-s{seed}", [blended, scorer_uri], go)


def candidates_stage(config: BoneaugConfig, data: str, run: str, key: str, unit_uri: str,
                     scorer_uri: str) -> dict[str, Any]:
    """This body part's UNIT candidates (`key`), scored by `scorer_uri` at the config's seed
    (what a Tune threshold sweep selects from); returns {"candidates": URI, "blended": count}."""
    from boneaug.augment.pipeline import ModelRef

    spec = TranslatorSpec("unit", model_uri=ModelRef.resolve(unit_uri).uri,
                          seed=config.augment.seed)
    blended = blend_stage(config, data, run, key, spec)
    return score_stage(config, run, key, blended, scorer_uri, config.drn.seed)


def learning_curve_training(config: BoneaugConfig, run: str, body_part: str, fracture: str,
                            seed: int, multiple: float) -> Training:
    """The baseline trained on `multiple` x the real training positives: a share of them
    (< 1), or all of them plus extra ones from the cohort's "extra" split (> 1)."""
    name = f"lc-{multiple:g}-s{seed}"
    publish = drn_publish(run, f"drn-{name}", f"boneaug/{body_part}/learning_curve")
    return Training(name, [config.drn, config.image, fracture, seed, multiple],
                    lambda cfg: train_drn(cfg, run, publish, augmented=None, init_from=fracture,
                                          seed=seed, positives=multiple))


def curve_positives(positives: int, multiple: float) -> int:
    """How many real training positives a learning-curve point at `multiple` trains on."""
    extra = round((multiple - 1.0) * positives) if multiple > 1 else 0
    return max(1, round(min(multiple, 1.0) * positives)) + extra


def train_positives(run: str) -> int:
    """Real training positives of the run's classification set (confounder images excluded)."""
    import pyarrow.compute as pc

    from boneaug.data.datasets import image_table

    table = image_table(run, columns=["split", "label"])  # no pixels: only counted
    train = pc.equal(table.column("split"), "train")
    return int(pc.sum(pc.and_(train, pc.equal(table.column("label"), 1))).as_py() or 0)


def _scorer(variant: Variant, seed: int, baseline: dict[str, Any],
            scorers: dict[str, dict[int, str]]) -> str:
    """The pseudo-labeller of `variant` at `seed`: this body part's baseline of that seed, or
    (TL_PL) the other body part's baseline of the same seed, else its @champion."""
    if variant.scorer_from is None:
        return str(baseline["model"])
    own = scorers.get(variant.scorer_from, {})
    return own.get(seed, f"models:/boneaug-drn-{variant.scorer_from}@champion")


@dataclass
class _Arm:
    """One variant's trained models at one seed, by t."""

    variant: Variant
    seed: int
    trained: dict[float, dict[str, Any]]
    candidates: dict[str, Any]
    baseline: dict[str, Any]  # the same seed's: what the arm is at a t that keeps no candidate

    @property
    def best_t(self) -> float:
        return best_t(self.trained)


def best_t(trained: Mapping[float, Mapping[str, Any]]) -> float:
    """The t of the grid whose DRN has the best val AUC (the first of a tie, in grid order)."""
    return max(trained, key=lambda t: trained[t]["val_auc"])


def _registered(body_part: str, variant: Variant, primary: bool) -> str | None:
    """The registered model of an arm's DRNs: the primary seed's UNIT and transfer arms'."""
    return f"boneaug-drn-{body_part}-aug" if primary and variant.arm == "unit" else None


def _arm_name(variant: Variant, t: float, seed: int) -> str:
    return f"drn-{variant.key}-t{t:.2f}-s{seed}"


def _arm_trainings(config: BoneaugConfig, run: str, body_part: str, fracture: str,
                   variant: Variant, seed: int, candidates: dict[str, Any],
                   grid: Sequence[float], primary: bool) -> list[Training]:
    """One arm's DRNs at `seed`, one per t of `grid` that keeps a candidate. A t that keeps
    none trains nothing: its DRN would be the seed's baseline bit for bit (the same rows, the
    same seed), so `_collect_arms` gives the arm the baseline's model and predictions there (a
    weak baseline, e.g. femur's 32 positives, passes no blend at t 0.70 or 0.90: each such t
    would retrain the baseline, minutes apiece)."""
    from boneaug.augment.pipeline import select_augmented

    registered = _registered(body_part, variant, primary)
    trainings = []
    for t in grid:
        selected = select_augmented(candidates["candidates"], t)
        name = _arm_name(variant, t, seed)
        if selected.num_rows == 0:
            print(f"[{name}] no candidate scores >= {t:.2f}: the arm is baseline-s{seed}",
                  flush=True)
            continue
        publish = drn_publish(run, name, f"boneaug/{body_part}/augment", registered)
        trainings.append(Training(
            name, [config.drn, config.image, candidates, t, fracture, seed],
            lambda cfg, publish=publish, selected=selected: {
                **train_drn(cfg, run, publish, augmented=selected, init_from=fracture,
                            seed=seed), "samples": selected.num_rows}))
    return trainings


def _collect_arms(run: str, body_part: str, arms: Sequence[tuple[_Arm, tuple[float, ...]]],
                  results: Mapping[str, dict[str, Any]], primary: bool) -> list[_Arm]:
    """Each of `arms` with its trained DRN per t of its grid (from `results`, by name), or its
    seed's baseline at a t that kept no candidate, and their predictions imported for the
    report; the UNIT and transfer arms of the primary seed are the registered ones."""
    from boneaug.eval.report import ModelMeta, import_predictions

    done = []
    for arm, grid in arms:
        variant, seed = arm.variant, arm.seed
        trained: dict[float, dict[str, Any]] = {}
        for t in grid:
            name = _arm_name(variant, t, seed)
            trained[t] = results[name] if name in results else arm.baseline | {"samples": 0}
            import_predictions(run, f"{variant.key}-t{t:.2f}-s{seed}", ModelMeta(
                type=variant.type, t=t, augmented_samples=trained[t]["samples"],
                model_name=(_registered(body_part, variant, primary) if name in results
                            else f"boneaug-drn-{body_part}"),
                model_version=trained[t]["version"], body_part=body_part, baseline=False,
                seed=seed, **training_history(trained[t])), trained[t]["predictions"])
        done.append(replace(arm, trained=trained))
    return done


def _publish_arm(config: BoneaugConfig, data: str, run: str, body_part: str, arm: _Arm,
                 baseline: dict[str, Any], result: BodyPartResult) -> None:
    """The primary seed's choice of t for one variant: derived DICOMs, Figure 3, aliases."""
    from boneaug.augment.pipeline import select_augmented, write_derived_dicoms
    from boneaug.eval.figures import figure3

    key, best_t = arm.variant.key, arm.best_t
    best = arm.trained[best_t]
    result.chosen[key] = best_t
    result.models[key] = best["model"]
    aug_uri = storage.join(run, "augmented", key)
    cands = arm.candidates
    dicoms = stage(run, f"dicom-{key}", [cands, best_t, best["model"]], lambda: {
        "files": len(write_derived_dicoms(
            data_uri=data, run_uri=run, selected=select_augmented(cands["candidates"], best_t),
            out_uri=storage.join(aug_uri, "dicom"), t=best_t))})
    print(f"[{key}] {dicoms['files']} derived DICOMs under {storage.join(aug_uri, 'dicom')}",
          flush=True)
    png = figure3(data_uri=data, run_uri=run, candidates_uri=cands["candidates"],
                  out_png=storage.join(run, "report", f"figure3_{key}.png"))
    if png:
        result.figures[key] = png
    registered = f"boneaug-drn-{body_part}-aug"
    note = f"val AUC {best['val_auc']:.3f} vs baseline {baseline['val_auc']:.3f}"
    if best["version"] and best["model"].startswith(f"models:/{registered}/"):
        alias = "champion" if best["val_auc"] > baseline["val_auc"] else "challenger"
        tracking.set_alias(registered, alias, best["version"])
        note += f"; {registered} v{best['version']} -> @{alias}"
    print(f"[{key}] t chosen on validation: {best_t:.2f} ({note})", flush=True)


def run_body_part(
    config: BoneaugConfig,
    body_part: BodyPart,
    *,
    data_uri: str,
    out_uri: str,
    run_id: str | None = None,
    synthesize: bool = True,
    plan: Plan = Plan(),
    scorers: dict[str, dict[int, str]] | None = None,
) -> BodyPartResult:
    """The paper's chain for one body part, its arms and instruments (`plan`); returns the report.

    Translators are trained and candidates blended once; every training seed of the plan
    repeats the classifier trainings: the baseline, the learning curve and the augmented DRNs,
    pseudo-labelled by that seed's baseline (`scorers`: other body parts' baselines per seed,
    for TL_PL). The first seed searches the t grid (one DRN per variant and
    t) and publishes: aliases, DICOMs, figures. Later seeds train each variant at the t the first
    seed chose on validation, and the learning curve's points above 1x (a baseline's cost each
    under ``augmented_epochs: baseline_steps``, 2-4x it otherwise) are the first seed's only:
    seeds measure the training's variance at the chosen setting, and three seeds of the whole
    grid would take the reproduction past 2.5 h on 2 cores.
    """
    from boneaug.eval.report import ModelMeta, import_predictions, render_report_from_predictions

    tracking.configure(config.tracking)
    run = storage.join(out_uri, "runs", run_id or f"{body_part}-{config.profile}")
    thresholds = tuple(plan.thresholds or config.augment.thresholds)
    grids = {v.key: tuple(plan.grids.get(v.key, thresholds)) for v in plan.variants}
    seeds = plan.seeds or (config.drn.seed,)
    ensure_cohort(config, data_uri, [body_part], synthesize=synthesize)
    ingest_stage(config, data_uri, run, body_part)
    fracture = fracture_model(config, data_uri, out_uri)
    patches_stage(config, data_uri, run, body_part)
    # every training first, each as soon as what it needs is there
    trained = train_stages(config, run, _all_trainings(config, data_uri, run, body_part, fracture,
                                                       plan, seeds, grids, scorers or {}))
    result = BodyPartResult(body_part, run, "", "")
    blended = {}
    for v in plan.variants:
        spec = translator_spec(config, data_uri, run, body_part, v)
        if spec.arm == "unit":
            result.models[f"{v.key}-unit"] = spec.label
        blended[v.key] = blend_stage(config, data_uri, run, v.key, spec)
    storage.remove(storage.join(run, "predictions"))
    _write_conspicuity(data_uri, run, body_part)
    positives = train_positives(run)
    # the report's rows: the primary seed's t grid and choices first, then the later seeds'
    # baselines, curves and arms at the chosen t
    for seed in seeds:
        primary = seed == seeds[0]
        baseline = trained[f"baseline-s{seed}"]
        result.baselines[seed] = baseline["model"]
        import_predictions(run, f"baseline-s{seed}", ModelMeta(
            type="Baseline", t=None, augmented_samples=0,
            model_name=f"boneaug-drn-{body_part}", model_version=baseline["version"],
            body_part=body_part, baseline=True, seed=seed, positives=positives,
            **training_history(baseline)), baseline["predictions"])
        for multiple in _curve_multiples(plan, primary):
            lc = trained[f"lc-{multiple:g}-s{seed}"]
            import_predictions(run, f"lc-{multiple:g}-s{seed}", ModelMeta(
                type="Learning curve", augmented_samples=0, body_part=body_part, seed=seed,
                positives=curve_positives(positives, multiple), learning_curve=True,
                **training_history(lc)), lc["predictions"])
        arms = []
        for variant in plan.variants:  # the candidates as the arms' trainings scored them
            scored = score_stage(config, run, variant.key, blended[variant.key],
                                 _scorer(variant, seed, baseline, scorers or {}), seed)
            grid = grids[variant.key] if primary else (result.chosen[variant.key],)
            arms.append((_Arm(variant, seed, {}, scored, baseline), grid))
        for arm in _collect_arms(run, body_part, arms, trained, primary):
            if primary:
                _publish_arm(config, data_uri, run, body_part, arm, baseline, result)
        if primary:
            result.models["baseline"] = baseline["model"]
            _publish_baseline(config, body_part, baseline, result, plan.variants)
    result.markdown = render_report_from_predictions(run, config.eval)
    result.report_uri = storage.join(run, "report")
    return result


def _all_trainings(config: BoneaugConfig, data: str, run: str, body_part: str, fracture: str,
                   plan: Plan, seeds: Sequence[int], grids: Mapping[str, tuple[float, ...]],
                   scorers: dict[str, dict[int, str]]) -> list[Training | Later]:
    """Every training of `plan`, each with what it waits for, so that two slots never idle
    while something could train: the translator beside the seeds' baselines and learning
    curves; an arm's DRNs once its seed's baseline can pseudo-label its candidates (TL_PL: at
    once, the other body part's baseline is there) and its translator is trained; a later
    seed's arm once the first seed's DRNs of that arm have chosen its t. `run_body_part`
    then finds them all done, in the stages these are named as."""
    first = seeds[0]

    def needs(variant: Variant, seed: int) -> tuple[str, ...]:
        return ((() if variant.scorer_from else (f"baseline-s{seed}",))
                + (("unit",) if variant.own_unit else ()))

    def arm(variant: Variant, seed: int, grid: tuple[float, ...],
            results: Mapping[str, dict[str, Any]]) -> list[Training]:
        spec = translator_spec(config, data, run, body_part, variant)
        blended = blend_stage(config, data, run, variant.key, spec)
        scorer = _scorer(variant, seed, results.get(f"baseline-s{seed}", {}), scorers)
        scored = score_stage(config, run, variant.key, blended, scorer, seed)
        return _arm_trainings(config, run, body_part, fracture, variant, seed, scored, grid,
                              primary=seed == first)

    def later_seed(variant: Variant, seed: int,
                   results: Mapping[str, dict[str, Any]]) -> list[Training]:
        baseline = results[f"baseline-s{first}"]
        chosen = best_t({t: results.get(_arm_name(variant, t, first), baseline)
                         for t in grids[variant.key]})
        return arm(variant, seed, (chosen,), results)

    def first_seed(variant: Variant, results: Mapping[str, dict[str, Any]]
                   ) -> list[Training | Later]:
        made = arm(variant, first, grids[variant.key], results)
        after = (*(t.name for t in made), f"baseline-s{first}")
        return [*made, *(Later(after + needs(variant, seed), partial(later_seed, variant, seed))
                         for seed in seeds[1:])]

    trainings = [_seed_trainings(config, run, body_part, fracture, plan, seed,
                                 primary=seed == first) for seed in seeds]
    return [*([unit_training(config, data, run, body_part)]
              if any(v.own_unit for v in plan.variants) else []),
            *(t[0] for t in trainings), *(t for each in trainings for t in each[1:]),
            *(Later(needs(v, first), partial(first_seed, v)) for v in plan.variants)]


def _seed_trainings(config: BoneaugConfig, run: str, body_part: str, fracture: str, plan: Plan,
                    seed: int, *, primary: bool) -> list[Training]:
    """A training seed's baseline and learning-curve points (above 1x for the primary seed
    only)."""
    return [baseline_training(config, run, body_part, fracture, seed),
            *(learning_curve_training(config, run, body_part, fracture, seed, m)
              for m in _curve_multiples(plan, primary))]


def _curve_multiples(plan: Plan, primary: bool) -> list[float]:
    return [m for m in plan.learning_curve if primary or m <= 1]


def _publish_baseline(config: BoneaugConfig, body_part: str, baseline: dict[str, Any],
                      result: BodyPartResult, variants: tuple[Variant, ...]) -> None:
    """The primary seed's baseline is the body part's @champion; its own translator and t are
    what its service (serve/) uses."""
    tracking.set_alias(f"boneaug-drn-{body_part}", "champion", baseline["version"])
    if OWN in variants:
        name, version = tracking.resolve(result.models[f"{OWN.key}-unit"])
        tracking.set_alias(name, "champion", str(version))
        tracking.set_version_tag(f"boneaug-drn-{body_part}", baseline["version"],
                                 tracking.PSEUDO_LABEL_T_TAG, f"{result.chosen[OWN.key]:.2f}")


def _write_conspicuity(data: str, run: str, body_part: str) -> None:
    """Each image's lesion conspicuity (synthetic cohorts annotate it), for the report's table
    by conspicuity band."""
    import pyarrow.compute as pc

    from boneaug.eval.report import write_conspicuity

    table = storage.read_parquet(storage.join(data, "annotations.parquet"))
    if "conspicuity" not in table.column_names:
        return
    table = table.filter(pc.and_(pc.equal(table.column("body_part"), body_part),
                                 pc.equal(table.column("task"), "lesion")))
    rows = table.select(["image_id", "conspicuity"]).to_pydict()
    write_conspicuity(run, rows["image_id"], rows["conspicuity"])


def critic_stage(config: BoneaugConfig, data: str, run: str, body_part: str,
                 translators: dict[str, str] | None = None) -> dict[str, Any]:
    """The phantom lesion critic of a synthetic cohort's body part (an instrument: see
    `boneaug.eval.phantom_critic`), validated on this run's real patch sets and on the
    translations of `translators` (label -> translator URI), and registered as
    boneaug-critic-<body_part>; returns its validation as numbers."""
    from boneaug.synth.cohort import generated_with

    if not generated_with(data, body_part, config.synth, seed=config.synth.seed):
        raise DataError(f"the phantom critic needs the synthetic cohort the config's synth section "
                        f"generates; {data} holds another {body_part} cohort")
    patches_stage(config, data, run, body_part)
    from boneaug.eval.phantom_critic import MAX_BLUR, MEMBERS

    inputs = [config.synth, config.patches, config.eval.critic_pairs, config.eval.critic_steps,
              MAX_BLUR, MEMBERS, translators]
    return stage(run, "critic", inputs,
                 lambda: _train_critic(config, run, body_part, translators or {}))


def _train_critic(config: BoneaugConfig, run: str, body_part: str,
                  translators: dict[str, str]) -> dict[str, Any]:
    import dataclasses
    from functools import partial

    import numpy as np

    from boneaug.augment.translate import load_translator, translate_patches
    from boneaug.data.patch_sets import load_patch_array
    from boneaug.eval import phantom_critic as pc
    from boneaug.eval.quality import CriticConfig

    settings = config.patches.body_parts[body_part]  # type: ignore[index]
    start = time.monotonic()
    print(f"[critic] rendering {config.eval.critic_pairs} phantom pairs (with and without a "
          f"lesion) ...", flush=True)
    pairs = pc.paired_patches(config.synth, body_part, n=config.eval.critic_pairs,
                              size=config.patches.size, s=settings.s, workers=2)
    print(f"[critic] {len(pairs.lesion)} pairs in {time.monotonic() - start:.0f} s; training "
          f"{pc.MEMBERS} critics of {config.eval.critic_steps} steps, twice (the held-out "
          f"check, then all pairs) ...",
          flush=True)
    critic, heldout = pc.train_phantom_critic(
        pairs, CriticConfig(steps=config.eval.critic_steps, holdout=0.0, seed=config.eval.seed,
                            max_blur=pc.MAX_BLUR))
    print(f"[critic] trained ({time.monotonic() - start:.0f} s); validating on the run's patch "
          f"sets{' and translators' if translators else ''} ...", flush=True)
    sets = {k: load_patch_array(storage.join(run, "patches", k)) for k in ("lesion", "normal")}
    validation = pc.validate(
        critic, heldout_pair_auc=heldout, lesion=sets["lesion"], normal=sets["normal"],
        translators={label: partial(translate_patches, load_translator(uri))
                     for label, uri in translators.items()})
    section = pc.markdown(validation, body_part)
    storage.write_text(storage.join(run, "report", "critic.md"), section)
    print(section, flush=True)
    name = f"boneaug-critic-{body_part}"
    with tracking.start_run(f"boneaug/{body_part}/critic", name,
                            {"pairs": len(pairs.lesion), "threshold": critic.threshold}):
        import mlflow

        mlflow.log_metrics({"heldout_pair_auc": heldout, "real_auc": validation.real_auc,
                            "worst_rise": validation.worst_rise})
        version = tracking.log_torch_model(critic.model.eval(), name="critic",
                                           input_example=np.zeros((1, 1, config.patches.size,
                                                                   config.patches.size),
                                                                  np.float32),
                                           registered_name=name, alias="champion")
    tracking.set_version_tag(name, str(version), "lesion_threshold", f"{critic.threshold:.6f}")
    return {"model": f"models:/{name}/{version}", "threshold": critic.threshold,
            "pairs": len(pairs.lesion), **dataclasses.asdict(validation),
            "worst_rise": validation.worst_rise}
