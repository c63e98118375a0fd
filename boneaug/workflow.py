"""The whole chain for one body part (paper sections 3-4), with stage reuse.

    cohort -> ingest -> patches -> UNIT (or another body part's: TL_G)
           -> fracture pre-training -> baseline DRN
           -> translate + blend + score (own baseline, or another body part's: TL_PL)
           -> augmented DRN per t of the grid -> t chosen on validation AUC
           -> paired bootstrap against the baseline on test -> report + registry aliases

Every stage records what it produced under <run>/stages/<name>.json with a fingerprint of its
inputs and settings; a stage whose fingerprint matches is reused, not recomputed, so re-running a
job after a crash or a change resumes where the inputs changed. Ray does the heavy lifting inside
each stage (Ray Data, Ray Train); this module only sequences them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from boneaug import storage, tracking
from boneaug.config import BodyPart, BoneaugConfig
from boneaug.errors import DataError

log = logging.getLogger(__name__)


def _fingerprint(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage(run_uri: str, name: str, inputs: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` unless <run>/stages/<name>.json holds a result for the same `inputs`."""
    uri = storage.join(run_uri, "stages", f"{name}.json")
    fingerprint = _fingerprint(inputs)
    if storage.exists(uri):
        done = json.loads(storage.read_bytes(uri))
        if done.get("fingerprint") == fingerprint:
            print(f"[{name}] reused ({uri})", flush=True)
            return done["result"]
    print(f"[{name}] running ...", flush=True)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    storage.write_text(uri, json.dumps({"fingerprint": fingerprint, "seconds": seconds,
                                        "result": result}, indent=2, default=str))
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return result


@dataclass(frozen=True)
class Variant:
    """One augmented row of a table: whose generator, whose pseudo-labeller."""

    key: str  # file-name safe, e.g. "aug", "tl_g", "tl_g_pl"
    type: str  # the paper's "Type" column
    unit_from: BodyPart | None = None  # None: this body part's own UNIT
    scorer_from: BodyPart | None = None  # None: this body part's own baseline


OWN = Variant("aug", "Augmented")


@dataclass
class BodyPartResult:
    body_part: str
    run_uri: str
    report_uri: str
    markdown: str
    chosen: dict[str, float] = field(default_factory=dict)  # variant key -> t
    models: dict[str, str] = field(default_factory=dict)  # role -> models:/name/version
    figures: dict[str, str] = field(default_factory=dict)  # variant key -> Figure 3 PNG URI


def ensure_cohort(config: BoneaugConfig, data_uri: str, body_parts: list[str], *,
                  synthesize: bool) -> None:
    """Make sure `data_uri` holds annotated DICOMs of `body_parts` (+ the fracture corpus)."""
    from boneaug.synth.cohort import generate_cohort

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
    missing = [p for p in body_parts if p not in have]
    needs_fractures = "fracture" not in have
    if not missing and not needs_fractures:
        return
    if not synthesize:
        raise DataError(f"{ann_uri} has no rows for {missing or ['the fracture corpus']}; "
                        "point --data at a cohort that has them, "
                        "or omit --data for the synthetic one")
    print(f"[cohort] synthesising {missing} (+ fracture corpus: {needs_fractures}) "
          f"into {data_uri}", flush=True)
    generate_cohort(config.synth, missing, data_uri, seed=config.synth.seed,
                    fractures=needs_fractures)


def _ray_train(config: BoneaugConfig) -> dict[str, Any]:
    """The Ray Train arguments every trainer here takes, from the config."""
    compute = config.compute
    return {"num_workers": compute.num_workers, "use_gpu": compute.use_gpu,
            "tracking_config": config.tracking, "cpus_per_worker": compute.cpus_per_worker,
            "max_failures": compute.max_failures}


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
    from boneaug.train.classifier import FRACTURE_MODEL, pretrain_fracture

    run = storage.join(out, "runs", f"fracture-{config.profile}")
    ingest_stage(config, data, run, "fracture")

    def go() -> dict[str, Any]:
        import ray.data

        table = image_table(run, task="fracture", classification=False)
        result = pretrain_fracture(
            config.drn, ray.data.from_arrow(table), run_uri=storage.join(run, "drn"),
            experiment="boneaug/fracture/pretrain",
            image_size=(config.image.height, config.image.width),
            overwrite=True, **_ray_train(config), torch_threads=config.compute.torch_threads,
        )
        return {"model": f"models:/{FRACTURE_MODEL}/{result.model_version}",
                "val_auc": result.best_val_auc}

    return stage(run, "fracture", [config.drn, config.image, config.compute.num_workers],
                 go)["model"]


def train_drn(config: BoneaugConfig, run: str, name: str, *, augmented: Any, init_from: str,
              registered_name: str, experiment: str) -> dict[str, Any]:
    from boneaug.data.datasets import classification_splits
    from boneaug.train.classifier import fit_classifier

    splits = classification_splits(run, augmented=augmented,
                                   max_train_negatives=config.drn.max_train_negatives,
                                   seed=config.drn.seed)
    result = fit_classifier(
        config.drn, splits["train"], splits["val"], test=splits["test"],
        run_uri=storage.join(run, name), experiment=experiment, registered_name=registered_name,
        init_from=init_from, image_size=(config.image.height, config.image.width), overwrite=True,
        run_name=f"{registered_name}-{name}", **_ray_train(config),
        torch_threads=config.compute.torch_threads,
    )
    return {"model": f"models:/{registered_name}/{result.model_version}",
            "version": result.model_version, "val_auc": result.best_val_auc,
            "predictions": result.predictions_uri}


def unit_model(config: BoneaugConfig, data: str, run: str, body_part: str) -> str:
    """This body part's UNIT, trained on its translation patch sets and registered."""
    patches = patches_stage(config, data, run, body_part)

    def go() -> dict[str, Any]:
        from boneaug.data.datasets import patch_dataset
        from boneaug.data.patch_sets import load_patch_array
        from boneaug.eval.quality import QualitySets
        from boneaug.train.unit import fit_unit

        sets = {k: storage.join(run, "patches", k) for k in ("lesion", "normal", "source")}
        read = {k: patch_dataset(sets[k]) for k in ("lesion", "normal")}
        quality = QualitySets(lesion=load_patch_array(sets["lesion"]),
                              normal=load_patch_array(sets["normal"]),
                              source=load_patch_array(sets["source"]))
        result = fit_unit(
            config.unit, read["lesion"], read["normal"], run_uri=run, quality_sets=quality,
            experiment=f"boneaug/{body_part}/train_unit",
            registered_name=f"boneaug-unit-{body_part}",
            overwrite=True, torch_threads=config.compute.torch_threads,
            **(_ray_train(config) | {"num_workers": max(1, config.compute.num_workers)}),
        )
        trust = ("" if result.critic_heldout_auc is None
                 else f" (critic held-out AUC {result.critic_heldout_auc:.2f})")
        print(f"[unit] quality: translated sources called lesion {result.frac_translated:.2f} vs "
              f"untranslated {result.frac_source:.2f}{trust}", flush=True)
        return {"model": f"models:/boneaug-unit-{body_part}/{result.model_version}",
                "frac_translated": result.frac_translated, "frac_source": result.frac_source}

    return stage(run, "unit", [config.unit, patches, config.compute.num_workers], go)["model"]


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


def baseline_stage(config: BoneaugConfig, run: str, body_part: str,
                   fracture: str) -> dict[str, Any]:
    """The baseline DRN (no augmentation), fine-tuned from the fracture model; registered as
    boneaug-drn-<body_part>."""
    return stage(run, "baseline", [config.drn, config.image, fracture],
                 lambda: train_drn(config, run, "drn-baseline", augmented=None, init_from=fracture,
                                    registered_name=f"boneaug-drn-{body_part}",
                                    experiment=f"boneaug/{body_part}/train_classifier"))


def candidates_stage(config: BoneaugConfig, data: str, run: str, key: str, unit_uri: str,
                     scorer_uri: str) -> dict[str, Any]:
    """The blended, scored candidates of one variant under <run>/augmented/<key> (made once;
    every t selects from them); returns {"candidates": URI, "blended": count}."""
    aug_uri = storage.join(run, "augmented", key)
    return stage(run, f"augment-{key}",
                 [unit_uri, scorer_uri, config.augment.blend_n, config.image,
                  storage.read_manifest(storage.join(run, "patches"))],
                 lambda: _blend(config, data, run, aug_uri, unit_uri, scorer_uri))


def run_body_part(
    config: BoneaugConfig,
    body_part: BodyPart,
    *,
    data_uri: str,
    out_uri: str,
    run_id: str | None = None,
    synthesize: bool = True,
    variants: tuple[Variant, ...] = (OWN,),
    thresholds: tuple[float, ...] | None = None,
) -> BodyPartResult:
    """The paper's chain for one body part; returns the report and the chosen thresholds."""
    from boneaug.augment.pipeline import select_augmented, write_derived_dicoms
    from boneaug.eval.figures import figure3
    from boneaug.eval.report import ModelMeta, import_predictions, render_report_from_predictions

    tracking.configure(config.tracking)
    run = storage.join(out_uri, "runs", run_id or f"{body_part}-{config.profile}")
    thresholds = tuple(thresholds or config.augment.thresholds)
    ensure_cohort(config, data_uri, [body_part], synthesize=synthesize)
    ingest_stage(config, data_uri, run, body_part)
    fracture = fracture_model(config, data_uri, out_uri)
    baseline = baseline_stage(config, run, body_part, fracture)
    result = BodyPartResult(body_part, run, "", "", models={"baseline": baseline["model"]})
    storage.remove(storage.join(run, "predictions"))
    import_predictions(run, "baseline", ModelMeta(type="Baseline", t=None, augmented_samples=0,
                                                  model_name=f"boneaug-drn-{body_part}",
                                                  model_version=baseline["version"],
                                                  body_part=body_part, baseline=True),
                       baseline["predictions"])
    for variant in variants:
        unit_uri = (unit_model(config, data_uri, run, body_part) if variant.unit_from is None
                    else f"models:/boneaug-unit-{variant.unit_from}@challenger")
        scorer_uri = (baseline["model"] if variant.scorer_from is None
                      else f"models:/boneaug-drn-{variant.scorer_from}@champion")
        patches_stage(config, data_uri, run, body_part)  # TL_G needs this body part's sources too
        result.models[f"{variant.key}-unit"] = unit_uri
        aug_uri = storage.join(run, "augmented", variant.key)
        cands = candidates_stage(config, data_uri, run, variant.key, unit_uri, scorer_uri)
        trained: dict[float, dict[str, Any]] = {}
        for t in thresholds:
            selected = select_augmented(cands["candidates"], t)
            trained[t] = stage(
                run, f"drn-{variant.key}-t{t:.2f}", [config.drn, config.image, cands, t, fracture],
                lambda selected=selected, t=t: {
                    **train_drn(config, run, f"drn-{variant.key}-t{t:.2f}", augmented=selected,
                                 init_from=fracture, registered_name=f"boneaug-drn-{body_part}-aug",
                                 experiment=f"boneaug/{body_part}/augment"),
                    "samples": selected.num_rows},
            )
            import_predictions(run, f"{variant.key}-t{t:.2f}", ModelMeta(
                type=variant.type, t=t, augmented_samples=trained[t]["samples"],
                model_name=f"boneaug-drn-{body_part}-aug", model_version=trained[t]["version"],
                body_part=body_part, baseline=False), trained[t]["predictions"])
        best_t = max(thresholds, key=lambda t: trained[t]["val_auc"])
        result.chosen[variant.key] = best_t
        best = trained[best_t]
        result.models[variant.key] = best["model"]
        dicoms = stage(run, f"dicom-{variant.key}", [cands, best_t, best["model"]], lambda: {
            "files": len(write_derived_dicoms(
                data_uri=data_uri, run_uri=run,
                selected=select_augmented(cands["candidates"], best_t),
                out_uri=storage.join(aug_uri, "dicom"), t=best_t))})
        print(f"[{variant.key}] {dicoms['files']} derived DICOMs under "
              f"{storage.join(aug_uri, 'dicom')}", flush=True)
        png = figure3(data_uri=data_uri, run_uri=run, candidates_uri=cands["candidates"],
                      out_png=storage.join(run, "report", f"figure3_{variant.key}.png"))
        if png:
            result.figures[variant.key] = png
        alias = "champion" if best["val_auc"] > baseline["val_auc"] else "challenger"
        tracking.set_alias(f"boneaug-drn-{body_part}-aug", alias, best["version"])
        print(f"[{variant.key}] t chosen on validation: {best_t:.2f} "
              f"(val AUC {best['val_auc']:.3f} vs baseline {baseline['val_auc']:.3f}); "
              f"boneaug-drn-{body_part}-aug v{best['version']} -> @{alias}",
              flush=True)
    tracking.set_alias(f"boneaug-drn-{body_part}", "champion", baseline["version"])
    if OWN in variants:  # this body part's own translator and t are what its service (serve/) uses
        name, version = tracking.resolve(result.models[f"{OWN.key}-unit"])
        tracking.set_alias(name, "champion", str(version))
        tracking.set_version_tag(f"boneaug-drn-{body_part}", baseline["version"],
                                 tracking.PSEUDO_LABEL_T_TAG, f"{result.chosen[OWN.key]:.2f}")
    result.markdown = render_report_from_predictions(run, config.eval)
    result.report_uri = storage.join(run, "report")
    return result


def _blend(config: BoneaugConfig, data: str, run: str, aug_uri: str, unit_uri: str,
           scorer_uri: str) -> dict[str, Any]:
    from boneaug.augment.pipeline import blend_and_score

    summary = blend_and_score(data_uri=data, run_uri=run, out_uri=aug_uri, unit_uri=unit_uri,
                              scorer_uri=scorer_uri, image=config.image, n=config.augment.blend_n,
                              tracking=config.tracking,
                              max_sources=config.augment.max_source_images)
    print(summary, flush=True)
    return {"candidates": summary.candidates_uri, "blended": summary.blended}

