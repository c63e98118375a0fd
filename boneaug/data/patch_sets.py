"""Patch-making with Ray Data (paper 3.2): plan on metadata, cut in parallel, balance, write.

    images/*.parquet (metadata + descriptors of the train split, no pixels)
    -> plan_patches (driver: which image, which crop, why)
    -> Ray Data: per image, re-read the DICOM at stored resolution, cut and resize its crops
    -> intensity filter (non-lesion) -> class balance -> patches/{lesion,normal,source}/*.parquet

Patches are cut from the stored image (not the downsampled classification image) because lesions
are a few dozen stored pixels wide. Every patch row keeps its provenance: image id, crop box in
stored pixels, s, the lesion box (or the matched box carried over), the matched lesion image.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from boneaug import storage
from boneaug.config import BodyPartPatches
from boneaug.data.arrays import decode_pixels, encode_pixels
from boneaug.data.ingest import objects_per_task
from boneaug.data.patches import (
    NEAR_DUPLICATE_IOU,
    CropTask,
    ImageMeta,
    Placement,
    balance,
    crop_resize,
    near_duplicate_pairs,
    plan_patches,
)
from boneaug.errors import DataError, StorageError

log = logging.getLogger(__name__)

KINDS = ("lesion", "normal", "source")
PATCHES_PER_FILE = 2048  # cut patches per write task: one file per set and task (at most
# ~270 MB of 256^2 paper patches); per cut block, 45 blocks wrote ~130 small files in 5 s
META_COLUMNS = ["image_id", "key", "split", "label", "confounders", "stored_boxes", "stored_rows",
                "stored_columns", "scale", "pad_x", "pad_y", "descriptor"]
PATCH_SCHEMA = pa.schema([
    ("patch_id", pa.string()), ("image_id", pa.string()), ("body_part", pa.string()),
    ("kind", pa.string()), ("crop", pa.list_(pa.int32())), ("s", pa.float32()),
    ("box", pa.list_(pa.int32())), ("matched_image_id", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("mean", pa.float32()), ("pixels", pa.binary()),
])


def read_image_meta(run_uri: str, split: str = "train") -> list[ImageMeta]:
    """Planning metadata of one split from a finished ingestion."""
    images_uri = storage.join(run_uri, "images")
    if storage.read_manifest(images_uri) is None:
        raise DataError(f"{images_uri} has no manifest: ingestion did not finish; "
                        "run jobs/ingest.py first")
    table = storage.read_parquet(images_uri, columns=META_COLUMNS)
    table = table.filter(pc.equal(table.column("split"), split))
    return [
        ImageMeta(
            image_id=r["image_id"], key=r["key"], label=int(r["label"]),
            boxes=tuple(tuple(b) for b in (r["stored_boxes"] or [])),
            confounded=bool(r["confounders"]),
            placement=Placement(r["stored_rows"], r["stored_columns"], r["scale"], r["pad_x"],
                                r["pad_y"]),
            descriptor=np.asarray(r["descriptor"], dtype=np.float32),
        )
        for r in table.to_pylist()
    ]


class CutBatch:
    """Ray Data callable: {key, tasks} groups -> one PATCH_SCHEMA row per crop."""

    def __init__(self, data_uri: str, body_part: str, size: int) -> None:
        self.data_uri = data_uri
        self.body_part = body_part
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from boneaug.io.dicom import decode_xray

        rows: list[dict[str, Any]] = []
        uris = [storage.join(self.data_uri, str(key)) for key in batch["key"]]
        for (uri, data), tasks in zip(storage.read_ahead(uris), batch["tasks"], strict=True):
            if isinstance(data, StorageError):
                raise data
            image = decode_xray(data, path=uri).pixels
            for task in tasks:
                patch = crop_resize(image, task["crop"], self.size)
                rows.append({**task, "body_part": self.body_part, "height": self.size,
                             "width": self.size, "mean": float(patch.mean()),
                             "pixels": encode_pixels(patch)})
        return pa.Table.from_pylist(rows, schema=PATCH_SCHEMA)


class WriteKept:
    """Ray Data callable: a batch of cut patches -> its kept rows of each set written as one file
    under ``<patches_uri>/<kind>`` (named by the batch's first patch, so a retried task rewrites
    it), and how many rows each file got. One pass writes all three sets."""

    def __init__(self, patches_uri: str, keep: dict[str, list[str]]) -> None:
        self.patches_uri = patches_uri
        self.keep = {kind: pa.array(ids, pa.string()) for kind, ids in keep.items()}

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return pa.table({"kind": list(self.keep), "rows": [0] * len(self.keep)})
        name = storage.shard_name(str(table.column("patch_id")[0]))
        written = []
        for kind, wanted in self.keep.items():
            rows = table.filter(pc.is_in(table.column("patch_id"), value_set=wanted))
            if rows.num_rows:
                storage.write_parquet(storage.join(self.patches_uri, kind, name),
                                      rows.drop_columns(["mean"]))
            written.append(rows.num_rows)
        return pa.table({"kind": list(self.keep), "rows": written})


def _task_row(task: CropTask) -> dict[str, Any]:
    return {"patch_id": task.patch_id, "image_id": task.image_id, "kind": task.kind,
            "crop": list(task.crop), "s": task.s, "box": list(task.box),
            "matched_image_id": task.matched_image_id}


@dataclass
class PatchSummary:
    run_uri: str
    images: int
    lesion_images: int
    translation_negatives: int
    source_images: int
    candidates: dict[str, int]
    dropped_low_intensity: dict[str, int]
    written: dict[str, int]
    near_duplicates: dict[str, int]  # same-image crop pairs with IoU >= NEAR_DUPLICATE_IOU
    seconds: float
    patches_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.patches_per_s = sum(self.candidates.values()) / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"patches {self.run_uri}: written {self.written}; {self.seconds:.1f} s, "
            f"{self.patches_per_s:.1f} patches/s\n"
            f"  from {self.images} train images ({self.lesion_images} with lesions, "
            f"{self.translation_negatives} negatives for translation, {self.source_images} "
            f"sources); cut {self.candidates}, dropped (mean < threshold) "
            f"{self.dropped_low_intensity}; near-duplicate pairs (same image, crop IoU >= "
            f"{NEAR_DUPLICATE_IOU}) {self.near_duplicates}"
        )


def make_patch_sets(
    *,
    data_uri: str,
    run_uri: str,
    body_part: str,
    settings: BodyPartPatches,
    size: int,
    min_mean_intensity: float,
    seed: int = 0,
    max_source_images: int | None = None,
) -> PatchSummary:
    """Plan, cut, filter, balance and write the three patch sets of one body part."""
    import ray

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    images = read_image_meta(run_uri)
    plan = plan_patches(images, s=settings.s, n=settings.n,
                        target_per_class=settings.translation_patches,
                        rng=rng, max_source_images=max_source_images)
    patches_uri = storage.join(run_uri, "patches")
    storage.remove(storage.join(patches_uri, storage.MANIFEST))
    storage.remove(patches_uri)

    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in (*plan.lesion, *plan.normal, *plan.source):
        by_key[task.key].append(_task_row(task))
    groups = [{"key": k, "tasks": v} for k, v in sorted(by_key.items())]
    per_task = objects_per_task(len(groups))
    cut = ray.data.from_items(
        groups, override_num_blocks=max(1, min(-(-len(groups) // per_task), 200))
    ).map_batches(
        CutBatch(data_uri, body_part, size), batch_size=per_task, batch_format="numpy"
    ).materialize()

    meta = cut.select_columns(["patch_id", "kind", "mean"]).to_pandas()
    ids = {kind: meta.loc[meta["kind"] == kind, ["patch_id", "mean"]] for kind in KINDS}
    clean = {k: ids[k].loc[ids[k]["mean"] >= min_mean_intensity, "patch_id"].tolist()
             for k in ("normal", "source")}
    lesion_ids, normal_ids = balance(ids["lesion"]["patch_id"].tolist(), clean["normal"], rng)
    keep = {"lesion": set(lesion_ids), "normal": set(normal_ids), "source": set(clean["source"])}

    writes = cut.map_batches(WriteKept(patches_uri, {k: sorted(v) for k, v in keep.items()}),
                             batch_size=PATCHES_PER_FILE, batch_format="pyarrow").to_pandas()
    got = writes.groupby("kind")["rows"].sum().to_dict()
    if any(got.get(kind, 0) != len(keep[kind]) for kind in KINDS):
        raise DataError(f"patch sets under {patches_uri}: wrote {got}, expected "
                        f"{ {k: len(v) for k, v in keep.items()} }")

    summary = PatchSummary(
        run_uri=run_uri, images=len(images),
        lesion_images=sum(im.label == 1 and bool(im.boxes) for im in images),
        translation_negatives=len(plan.translation_negatives),
        source_images=len({t.image_id for t in plan.source}),
        candidates={k: len(ids[k]) for k in KINDS},
        dropped_low_intensity={k: len(ids[k]) - len(clean[k]) for k in ("normal", "source")},
        written={k: len(keep[k]) for k in KINDS},
        near_duplicates={kind: near_duplicate_pairs((t.image_id, t.crop) for t in tasks
                                                    if t.patch_id in keep[kind])
                         for kind, tasks in zip(KINDS, (plan.lesion, plan.normal, plan.source),
                                                strict=True)},
        seconds=time.perf_counter() - start,
    )
    storage.publish_manifest(patches_uri, {"stage": "patches", "body_part": body_part, "seed": seed,
                                           "settings": settings.model_dump(), "size": size,
                                           **asdict(summary)})
    return summary


def load_patch_array(uri: str) -> np.ndarray:
    """One patch set (e.g. <run>/patches/lesion) -> (N, 1, S, S) float32 in [0, 1], by
    patch_id."""
    table = storage.read_parquet(uri, columns=["patch_id", "height", "width",
                                               "pixels"]).sort_by("patch_id")
    if table.num_rows == 0:
        raise DataError(f"no patches under {uri}")
    rows = table.to_pylist()
    return np.stack([decode_pixels(r["pixels"], r["height"], r["width"])[None] for r in rows])
