"""Generate the synthetic cohort: DICOM files plus the annotation table (CONTRACTS.md layout).

    <root>/dicom/<body_part>/<image_id>.dcm     lesion task, one body part per folder
    <root>/dicom/fracture/<image_id>.dcm        auxiliary fracture corpus (mixed body parts)
    <root>/annotations.parquet                  one row per image, written last, atomically
    <root>/synth.json                           which SynthConfig, seed and scale made each part

Sizes. `config.counts[body_part]` (paper Table 1) counts the images of the classification sets,
which exclude confounded images (paper 4.1). The generator writes exactly those clean images,
and in addition confounded ones (hardware, external objects, deformity) at the rate
`config.confounder_fraction[body_part]` of all images; tibia and femur positives carry
confounders 2.5x as often (paper 4.3: "frequent confounding image content ... in the not
excluded positives"). Filtering `confounders == []` gives back the configured counts.

Patients. Each synthetic patient has 1-3 radiographs (mean `images_per_patient`), all in one
split, with one label: a lesion patient's radiographs all show the same lesion (other view,
framing, exposure), their anatomy and hardware are the same person's. Splits are disjoint by
patient by construction.

Determinism. The plan (patients, splits, ids) comes from rng([seed, part]); a patient from
rng([seed, part, patient_index, 7]); an image from rng([seed, part, image_index]) - so the bytes
do not depend on the number of workers or the order in which chunks finish.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from boneaug import storage
from boneaug.config import BODY_PARTS, SynthConfig
from boneaug.errors import ConfigError
from boneaug.progress import interactive
from boneaug.synth.dicom_out import DicomIdentity, encode_dicom
from boneaug.synth.render import render_image
from boneaug.synth.spec import (
    BODY_PART_INDEX,
    CONFOUNDERS,
    ImageSpec,
    PatientSpec,
    sample_image,
    sample_patient,
)

logger = logging.getLogger("boneaug.synth")

ANNOTATIONS = "annotations.parquet"
RECORD = "synth.json"  # what generated each body part: the phantom re-renders from it
SPLITS = ("train", "val", "test")
PATIENT_STREAM = 7
VISIBILITY_TRIES = 12  # lesion redraws per patient under SynthConfig's visibility window
EXTRA_STREAM = 11
PART_TAG = {"humerus": "HUM", "tibia": "TIB", "femur": "FEM", "fracture": "FRX"}
FRACTURE_VAL_SHARE = 0.15
POSITIVE_CONFOUNDER_BOOST = {"humerus": 1.0, "tibia": 2.5, "femur": 2.5}
CONFOUNDER_MIX = (0.45, 0.35, 0.20)  # hardware, external_object, deformity

ANNOTATION_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("key", pa.string()),
    ("body_part", pa.string()),
    ("task", pa.string()),
    ("patient_id", pa.string()),
    ("split", pa.string()),
    ("label", pa.int8()),
    ("boxes", pa.list_(pa.list_(pa.int32()))),
    ("lesion_type", pa.string()),
    ("conspicuity", pa.float32()),
    ("visibility", pa.float32()),  # measured: see lesion_visibility (null without a lesion)
    ("confounders", pa.list_(pa.string())),
    ("fracture", pa.int8()),
    ("view", pa.string()),
    ("rows", pa.int32()),
    ("columns", pa.int32()),
    ("pixel_spacing_mm", pa.float32()),
    ("photometric", pa.string()),
])


@dataclass(frozen=True)
class ImageJob:
    """One image to render and write (picklable: it travels to a worker process)."""

    image_id: str
    key: str
    body_part: str  # anatomy rendered
    task: str  # "lesion" | "fracture"
    stream: int  # rng stream: index of the body part, or of the fracture corpus
    image_index: int
    patient_index: int
    patient_id: str
    study_index: int
    split: str
    label: int
    fracture: int
    confounders: tuple[str, ...]


@dataclass
class CohortSummary:
    """What was written: images per body part / split / label, and how fast."""

    out_uri: str
    counts: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    clean_counts: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    fracture_counts: dict[str, dict[int, int]] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    workers: int = 1

    def describe(self) -> str:
        """Lines for a person: lesion:non-lesion images per split and body part (all, then those
        without confounders, which the classification sets keep), the fracture corpus, speed."""
        def splits(by_split: dict[str, dict[int, int]]) -> str:
            return "  ".join(f"{split} {c.get(1, 0)}:{c.get(0, 0)}"
                             for split, c in sorted(by_split.items()))

        lines = [f"wrote {self.images} images to {self.out_uri} in {self.seconds:.1f} s "
                 f"({self.images_per_s:.1f} img/s, {self.workers} worker(s)); "
                 f"lesion:non-lesion per split"]
        for part, by_split in self.counts.items():
            lines.append(f"  {part}: {splits(by_split)}"
                         f"  (without confounders: {splits(self.clean_counts.get(part, {}))})")
        if self.fracture_counts:
            lines.append(f"  fracture corpus (fracture:none): {splits(self.fracture_counts)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ planning

def _group_sizes(n: int, mean: float, rng: np.random.Generator) -> list[int]:
    """Images per patient, 1-3 with the given mean, summing to n."""
    p = float(np.clip((mean - 1.0) / 2.0, 0.0, 1.0))
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(1 + int(rng.binomial(2, p)))
    if sizes:
        sizes[-1] -= sum(sizes) - n
    return [s for s in sizes if s > 0]


def _confounder_set(rng: np.random.Generator) -> tuple[str, ...]:
    k = 1 if rng.random() < 0.8 else 2
    picked = rng.choice(len(CONFOUNDERS), size=k, replace=False, p=np.array(CONFOUNDER_MIX))
    return tuple(CONFOUNDERS[i] for i in sorted(picked))


def _study_date(patient_index: int, study_index: int) -> str:
    day = dt.date(2012, 1, 2) + dt.timedelta(days=(patient_index * 37) % 3300 + 61 * study_index)
    return day.strftime("%Y%m%d")


def plan_body_part(config: SynthConfig, body_part: str, *, seed: int,
                   scale: float) -> list[ImageJob]:
    """Every image of one body part's lesion cohort, grouped by patient, ids shuffled."""
    stream = BODY_PART_INDEX[body_part]
    rng = np.random.default_rng([seed, stream])
    counts = config.counts[body_part].scaled(scale).model_dump()
    rate = config.confounder_fraction.get(body_part, 0.0)  # type: ignore[call-overload]
    patients: list[tuple[str, int, int, tuple[str, ...]]] = []  # split, label, size, confounders
    for split in SPLITS:
        for label in (1, 0):
            n = counts[f"{split}_{'pos' if label else 'neg'}"]
            r = min(0.6, rate * (POSITIVE_CONFOUNDER_BOOST[body_part] if label else 1.0))
            n_conf = int(round(n * r / (1.0 - r))) if n and r > 0 else 0
            for size in _group_sizes(n, config.images_per_patient, rng):
                patients.append((split, label, size, ()))
            for size in _group_sizes(n_conf, config.images_per_patient, rng):
                patients.append((split, label, size, _confounder_set(rng)))
    order = list(rng.permutation(len(patients)))
    # the learning curve's extra positives come last, from a stream of their own: a cohort
    # without them is byte for byte the one it was before they existed
    extra_rng = np.random.default_rng([seed, stream, EXTRA_STREAM])
    for size in _group_sizes(counts["extra_pos"], config.images_per_patient, extra_rng):
        order.append(len(patients))
        patients.append(("extra", 1, size, ()))
    jobs: list[ImageJob] = []
    tag = PART_TAG[body_part]
    for p_index, k in enumerate(order):
        split, label, size, confounders = patients[int(k)]
        for study in range(size):
            i = len(jobs)
            image_id = f"{body_part}-{i:06d}"
            jobs.append(ImageJob(
                image_id=image_id, key=f"dicom/{body_part}/{image_id}.dcm", body_part=body_part,
                task="lesion", stream=stream, image_index=i, patient_index=p_index,
                patient_id=f"SYN{seed}-{tag}-{p_index:05d}", study_index=study, split=split,
                label=label, fracture=0, confounders=confounders,
            ))
    return jobs


def plan_fractures(config: SynthConfig, *, seed: int, scale: float) -> list[ImageJob]:
    """The auxiliary fracture corpus: mixed body parts, about half with a fracture."""
    stream = BODY_PART_INDEX["fracture"]
    rng = np.random.default_rng([seed, stream])
    n = int(round(config.fracture_images * scale)) if config.fracture_images else 0
    if config.fracture_images and n == 0:
        n = 1
    jobs: list[ImageJob] = []
    p_index = 0
    first = int(rng.integers(0, 2))
    for size in _group_sizes(n, config.images_per_patient, rng):
        body_part = BODY_PARTS[int(rng.integers(0, len(BODY_PARTS)))]
        fracture = (p_index + first) % 2  # every other patient: about half the images
        split = "val" if rng.random() < FRACTURE_VAL_SHARE else "train"
        for study in range(size):
            i = len(jobs)
            image_id = f"fracture-{i:06d}"
            jobs.append(ImageJob(
                image_id=image_id, key=f"dicom/fracture/{image_id}.dcm", body_part=body_part,
                task="fracture", stream=stream, image_index=i, patient_index=p_index,
                patient_id=f"SYN{seed}-FRX-{p_index:05d}", study_index=study, split=split,
                label=0, fracture=fracture, confounders=(),
            ))
        p_index += 1
    return jobs


# ------------------------------------------------------------------------------------ rendering

def _patient(job: ImageJob, seed: int, conspicuity_range: tuple[float, float],
             attempt: int = 0) -> PatientSpec:
    stream = [seed, job.stream, job.patient_index, PATIENT_STREAM] + ([attempt] if attempt else [])
    return sample_patient(job.body_part, np.random.default_rng(stream),
                          patient_id=job.patient_id, lesion=bool(job.label),
                          confounders=job.confounders, fracture=bool(job.fracture),
                          conspicuity_range=conspicuity_range)


def lesion_visibility(with_lesion: np.ndarray, without: np.ndarray, pool: int) -> float:
    """The largest change a lesion makes to one pixel of the image average-pooled by `pool`
    (what a classifier that downsamples by `pool` sees), in display-range units."""
    diff = np.abs(with_lesion - without)
    h, w = (diff.shape[0] // pool) * pool, (diff.shape[1] // pool) * pool
    pooled = diff[:h, :w].reshape(h // pool, pool, w // pool, pool).mean(axis=(1, 3))
    return float(pooled.max())


def _visibility(spec: ImageSpec, rng: np.random.Generator, pool: int) -> tuple[Any, float]:
    """(the rendered image, its lesion's visibility): rendered twice, with and without the
    lesion, on the same quantum noise."""
    before = copy.deepcopy(rng)
    image = render_image(spec, rng)
    without = render_image(spec.without_lesion(), before)
    return image, lesion_visibility(image.pixels, without.pixels, pool)


def patient_of(job: ImageJob, config: SynthConfig, seed: int) -> PatientSpec:
    """The patient of `job`. A lesion patient is redrawn (up to VISIBILITY_TRIES times) until
    the lesion's visibility on the patient's first image lies in the window
    [`SynthConfig.min_visibility`, `max_visibility`]; the draw nearest to it is kept when none
    does."""
    return _drawn_patient(job, config, seed)[0]


def _first_image(patient: PatientSpec, job: ImageJob, config: SynthConfig, seed: int
                 ) -> tuple[Any, float]:
    """(the render of `patient`'s first image, its lesion's visibility), drawn exactly as
    render_job draws that image."""
    first = job.image_index - job.study_index  # a patient's images are planned in a row
    rng = np.random.default_rng([seed, job.stream, first])
    spec = sample_image(patient, config, rng, study_index=0)
    return _visibility(spec, rng, config.visibility_pool)


def _drawn_patient(job: ImageJob, config: SynthConfig, seed: int
                   ) -> tuple[PatientSpec, tuple[Any, float] | None]:
    """`patient_of`, and the render of the patient's first image with its visibility when the
    draw that was kept rendered it (None otherwise): render_job reuses it instead of rendering
    the same image twice more."""
    patient = _patient(job, seed, config.conspicuity_range)
    if patient.lesion is None or not config.checks_visibility:
        return patient, None
    best: tuple[float, PatientSpec] = (float("inf"), patient)
    for attempt in range(VISIBILITY_TRIES):
        candidate = patient if attempt == 0 else _patient(job, seed, config.conspicuity_range,
                                                          attempt)
        rendered = _first_image(candidate, job, config, seed)
        miss = config.visibility_miss(rendered[1])
        if miss == 0:
            return candidate, rendered
        best = min(best, (miss, candidate), key=lambda b: b[0])
    return best[1], None


def render_job(
    job: ImageJob,
    config: SynthConfig,
    seed: int,
    cache: dict[tuple[int, int], PatientSpec] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """(DICOM bytes, annotation row) of one image; no I/O."""
    key = (job.stream, job.patient_index)
    patient = cache.get(key) if cache is not None else None
    rendered = None
    if patient is None:
        patient, rendered = _drawn_patient(job, config, seed)
        if cache is not None:
            cache[key] = patient
    rng = np.random.default_rng([seed, job.stream, job.image_index])
    spec = sample_image(patient, config, rng, study_index=job.study_index)
    visibility = None
    if rendered is not None and job.study_index == 0:  # the visibility check drew this image
        image, visibility = rendered
    elif patient.lesion is not None:
        image, visibility = _visibility(spec, rng, config.visibility_pool)
    else:
        image = render_image(spec, rng)
    data = encode_dicom(image, DicomIdentity(
        image_id=job.image_id, patient_id=job.patient_id, seed=seed,
        study_date=_study_date(job.patient_index, job.study_index), instance_number=1,
    ))
    lesion = patient.lesion
    row = {
        "image_id": job.image_id, "key": job.key, "body_part": job.body_part, "task": job.task,
        "patient_id": job.patient_id, "split": job.split, "label": job.label,
        "boxes": image.boxes,
        "lesion_type": lesion.lesion_type if lesion is not None else None,
        "conspicuity": lesion.conspicuity if lesion is not None else None,
        "visibility": visibility,
        "confounders": list(patient.confounders), "fracture": job.fracture, "view": spec.view,
        "rows": spec.height, "columns": spec.width, "pixel_spacing_mm": spec.spacing_mm,
        "photometric": spec.photometric,
    }
    return data, row


def _run_chunk(jobs: list[ImageJob], config: SynthConfig, seed: int,
               out_uri: str) -> list[dict[str, Any]]:
    cache: dict[tuple[int, int], PatientSpec] = {}
    rows = []
    for job in jobs:
        data, row = render_job(job, config, seed, cache)
        storage.write_bytes(storage.join(out_uri, job.key), data)
        rows.append(row)
    return rows


def _chunks(jobs: list[ImageJob], size: int) -> list[list[ImageJob]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


class _Progress:
    """A bar on a terminal (boneaug.progress); else a line every `every` images."""

    def __init__(self, total: int, enabled: bool, every: int) -> None:
        self.total, self.enabled, self.every = total, enabled, max(1, every)
        self.done = 0
        self.next = self.every
        self.start = time.perf_counter()
        self.bar = None
        if enabled and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="[synth]", unit="img", dynamic_ncols=True)

    def add(self, n: int, label: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description(f"[synth] {label}", refresh=False)
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
            return
        if self.enabled and (self.done >= self.next or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"[boneaug.synth] {label}: {self.done}/{self.total} images ({rate:.1f} img/s)",
                  file=sys.stderr, flush=True)
            while self.next <= self.done:
                self.next += self.every


def _render_all(jobs: list[ImageJob], config: SynthConfig, seed: int, out_uri: str, workers: int,
                progress: bool) -> list[dict[str, Any]]:
    bar = _Progress(len(jobs), progress, every=max(50, len(jobs) // 20))
    if workers <= 1 or len(jobs) < 16:
        rows = []
        for chunk in _chunks(jobs, 16):
            rows += _run_chunk(chunk, config, seed, out_uri)
            bar.add(len(chunk), chunk[-1].key.split("/")[1])
        return rows
    size = int(np.clip(len(jobs) // (workers * 8), 4, 24))
    rows = []
    # spawn: workers start clean (no inherited S3 event loop, locks or thread pools)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: set[Future[list[dict[str, Any]]]] = {
            pool.submit(_run_chunk, chunk, config, seed, out_uri) for chunk in _chunks(jobs, size)
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                result = fut.result()
                rows += result
                bar.add(len(result), result[-1]["key"].split("/")[1] if result else "")
    return rows


# ------------------------------------------------------------------------------------ tables

def _table(rows: list[dict[str, Any]]) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["image_id"])
    return pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA)


def _merge(out_uri: str, new: pa.Table, body_parts: Sequence[str], fractures: bool) -> pa.Table:
    uri = storage.join(out_uri, ANNOTATIONS)
    if not storage.exists(uri):
        return new
    old = storage.read_parquet(uri)
    replaced = pc.and_(pc.equal(old["task"], "lesion"),
                       pc.is_in(old["body_part"], pa.array(list(body_parts), pa.string())))
    if fractures:
        replaced = pc.or_(replaced, pc.equal(old["task"], "fracture"))
    kept = old.filter(pc.invert(replaced))
    for name in set(ANNOTATION_SCHEMA.names) - set(kept.column_names):  # an older cohort's
        kept = kept.append_column(name, pa.nulls(kept.num_rows,
                                                 ANNOTATION_SCHEMA.field(name).type))
    kept = kept.select(ANNOTATION_SCHEMA.names).cast(ANNOTATION_SCHEMA)
    merged = pa.concat_tables([kept, new])
    return merged.sort_by([("task", "ascending"), ("image_id", "ascending")])


def _remove_stale(out_uri: str, folder: str, keep: set[str]) -> int:
    removed = 0
    prefix = storage.join(out_uri, "dicom", folder)
    for uri in storage.list_files(prefix, suffix=".dcm"):
        rel = f"dicom/{folder}/{uri.rsplit('/', 1)[-1]}"
        if rel not in keep:
            storage.remove(uri)
            removed += 1
    return removed


def _count(rows: list[dict[str, Any]], clean: bool) -> dict[str, dict[str, dict[int, int]]]:
    out: dict[str, dict[str, dict[int, int]]] = {}
    for r in rows:
        if r["task"] != "lesion" or (clean and r["confounders"]):
            continue
        split = out.setdefault(r["body_part"], {}).setdefault(r["split"], {0: 0, 1: 0})
        split[r["label"]] += 1
    return out


def read_record(out_uri: str) -> dict[str, dict[str, Any]]:
    """body part (or "fracture") -> {"synth": SynthConfig as JSON data, "seed", "scale"} of the
    generate_cohort call that wrote it; empty for a cohort this generator did not write."""
    uri = storage.join(out_uri, RECORD)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}


def generated_with(out_uri: str, part: str, config: SynthConfig, *, seed: int,
                   scale: float = 1.0) -> bool:
    """True when `part` of the cohort at `out_uri` is what `config`, `seed` and `scale`
    generate (so the phantom can re-render its images)."""
    made = read_record(out_uri).get(part)
    return made == _entry(config, seed, scale)


def _entry(config: SynthConfig, seed: int, scale: float) -> dict[str, Any]:
    return {"synth": config.model_dump(mode="json"), "seed": seed, "scale": scale}


def _record(out_uri: str, config: SynthConfig, parts: Sequence[str], seed: int,
            scale: float) -> None:
    record = read_record(out_uri)
    record.update({part: _entry(config, seed, scale) for part in parts})
    storage.write_text(storage.join(out_uri, RECORD), json.dumps(record, indent=1))


def generate_cohort(
    config: SynthConfig,
    body_parts: Sequence[str],
    out_uri: str,
    *,
    seed: int = 0,
    scale: float = 1.0,
    fractures: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> CohortSummary:
    """Render and write the cohort of `body_parts` (and the fracture corpus) under `out_uri`.

    Returns counts per body part / split / label (all images and clean ones), seconds and
    images per second. Rows of body parts not generated here are kept in annotations.parquet.
    """
    unknown = [b for b in body_parts if b not in BODY_PARTS]
    if unknown:
        raise ConfigError(f"unknown body part(s) {unknown}; choose from {', '.join(BODY_PARTS)}")
    if scale <= 0:
        raise ConfigError(f"scale must be > 0, got {scale}")
    missing = [b for b in body_parts if b not in config.counts]
    if missing:
        raise ConfigError(f"synth.counts has no entry for {missing}; add SplitCounts for them")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    out_uri = out_uri.rstrip("/")
    start = time.perf_counter()
    jobs: list[ImageJob] = []
    keys_by_folder: dict[str, set[str]] = {}
    for body_part in dict.fromkeys(body_parts):
        part_jobs = plan_body_part(config, body_part, seed=seed, scale=scale)
        jobs += part_jobs
        keys_by_folder[body_part] = {j.key for j in part_jobs}
    if fractures:
        part_jobs = plan_fractures(config, seed=seed, scale=scale)
        jobs += part_jobs
        keys_by_folder["fracture"] = {j.key for j in part_jobs}
    rows = _render_all(jobs, config, seed, out_uri, workers, progress)
    summary = CohortSummary(out_uri=out_uri, workers=workers)
    for r in rows:
        if r["task"] == "fracture":
            split = summary.fracture_counts.setdefault(r["split"], {0: 0, 1: 0})
            split[r["fracture"]] += 1
    table = _merge(out_uri, _table(rows), list(body_parts), fractures)
    storage.write_parquet(storage.join(out_uri, ANNOTATIONS), table)
    _record(out_uri, config, [*body_parts, *(["fracture"] if fractures else [])], seed, scale)
    for folder, keep in keys_by_folder.items():
        stale = _remove_stale(out_uri, folder, keep)
        if stale:
            logger.info("removed %d stale DICOM files under dicom/%s", stale, folder)
    seconds = time.perf_counter() - start
    summary.counts = _count(rows, clean=False)
    summary.clean_counts = _count(rows, clean=True)
    summary.images = len(rows)
    summary.seconds = seconds
    summary.images_per_s = len(rows) / max(seconds, 1e-9)
    if progress:
        print(f"[boneaug.synth] wrote {len(rows)} images to {out_uri} in {seconds:.1f} s "
              f"({summary.images_per_s:.1f} img/s, {workers} worker(s))",
              file=sys.stderr, flush=True)
    return summary
