"""Ingestion with Ray Data: DICOM objects under a URI -> classification-size image shards + rejects.

    list DICOM objects -> read + decode (boneaug.io.dicom), sharded over the cluster
    -> join the annotation row -> fit-and-pad to the classification size, boxes mapped
    -> images/*.parquet (decoded) + rejects.parquet (path, reason, message)

One pass: each Ray Data task reads its objects (`storage.read_ahead`: the next few are in flight
while it decodes the last ones), decodes them, writes its decoded rows as one shard and returns
only their small record (path, outcome, split, label, confounders). The pixels go from the task
that decoded them straight to storage, never through the object store or the driver, and the
driver's summary and rejects table come from the records. Measured against the earlier decode ->
materialize -> write -> rejects -> summary (four executions, one 8-row file per block) and a
plain loop: see benchmarks/bench_ingest.py.

Counts are conserved: every listed object is either written or rejected, with a reason
(`no_annotation` for objects the annotation table does not know). Confounder images are written
(patch-making keeps them for the lesion set); classification sets drop them when they load
(`classification_filter`). Outputs are replaced wholesale on a re-run of the same run id, and the
stage's manifest is written last.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from boneaug import storage
from boneaug.config import ImageConfig
from boneaug.data.arrays import encode_pixels
from boneaug.data.patches import descriptor
from boneaug.errors import DataError, StorageError
from boneaug.io.resize import map_box

log = logging.getLogger(__name__)

ANNOTATION_COLUMNS = ("image_id", "key", "body_part", "label", "boxes", "patient_id", "split")

IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("key", pa.string()), ("path", pa.string()),
    ("ok", pa.bool_()), ("reason", pa.string()), ("message", pa.string()),
    ("body_part", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("label", pa.int8()), ("fracture", pa.int8()), ("patient_id", pa.string()),
    ("confounders", pa.list_(pa.string())), ("view", pa.string()),
    ("boxes", pa.list_(pa.list_(pa.int32()))),         # classification-frame pixels
    ("stored_boxes", pa.list_(pa.list_(pa.int32()))),  # stored-image pixels
    ("height", pa.int32()), ("width", pa.int32()),
    ("stored_rows", pa.int32()), ("stored_columns", pa.int32()),
    ("scale", pa.float32()), ("pad_x", pa.float32()), ("pad_y", pa.float32()),
    ("photometric", pa.string()), ("sop_uid", pa.string()), ("study_uid", pa.string()),
    ("descriptor", pa.list_(pa.float32())), ("pixels", pa.binary()),
])
REJECT_COLUMNS = ["path", "reason", "message"]
RECORD_COLUMNS = ["path", "ok", "reason", "message", "split", "label", "confounders"]
MAX_OBJECTS_PER_TASK = 128  # an ingest shard holds up to 128 images (~8 MB at the local size)


def objects_per_task(objects: int, cpus: int | None = None) -> int:
    """How many objects (DICOMs) one Ray Data task of ingest or patch-making reads: as many as
    MAX_OBJECTS_PER_TASK, because a task's first read and its last write overlap nothing (at 32
    a task that cost a quarter of the ingest time of 1064 DICOMs on a 2-CPU head), and as few as
    give every CPU of the cluster (`cpus`, default: the running cluster's) two tasks."""
    if cpus is None:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(MAX_OBJECTS_PER_TASK, -(-objects // (2 * max(1, cpus)))))


def load_annotations(data_uri: str) -> pa.Table:
    """<data_uri>/annotations.parquet, checked for the columns ingestion relies on."""
    uri = (data_uri if data_uri.endswith(".parquet")
           else storage.join(data_uri, "annotations.parquet"))
    table = storage.read_parquet(uri)
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{uri} lacks column(s) {missing}; "
            f"an annotation table needs {list(ANNOTATION_COLUMNS)} "
            "(see README, 'Bring your own data')"
        )
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise DataError(f"{uri}: key {dup!r} appears more than once; one row per image")
    return table


class DecodeBatch:
    """Ray Data map_batches callable: {uri} -> rows of IMAGE_SCHEMA (ok or rejected).

    Each task reads its objects itself (fsspec, the endpoint and credentials of its node's
    environment), so reading and decoding are one task and an unreadable object is one reject.
    """

    def __init__(self, annotations: dict[str, dict[str, Any]], root_path: str,
                 image: ImageConfig, descriptor_rows: int) -> None:
        self.annotations = annotations
        self.root_path = root_path.rstrip("/")
        self.target = (image.height, image.width)
        self.descriptor_rows = descriptor_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        uris = [str(uri) for uri in batch["uri"]]
        return pa.Table.from_pylist([self.read_one(uri, data)
                                     for uri, data in storage.read_ahead(uris)],
                                    schema=IMAGE_SCHEMA)

    def read_one(self, uri: str, data: bytes | StorageError) -> dict[str, Any]:
        """`one` on an object's bytes; a read failure is a reject (`unreadable`)."""
        path = storage.filesystem(uri)[1]
        if isinstance(data, StorageError):
            key = path[len(self.root_path) + 1:] if path.startswith(self.root_path + "/") else path
            return {"path": path, "key": key, "ok": False, "reason": "unreadable",
                    "message": str(data)}
        return self.one(data, path)

    def one(self, data: bytes, path: str) -> dict[str, Any]:
        """One object's row: decoded, or rejected with a reason and a message."""
        key = path[len(self.root_path) + 1:] if path.startswith(self.root_path + "/") else path
        row: dict[str, Any] = {"path": path, "key": key, "ok": False}
        ann = self.annotations.get(key)
        if ann is None:
            return row | {"reason": "no_annotation",
                          "message": f"{path}: no row with key {key!r} in annotations.parquet"}
        row |= {"image_id": ann["image_id"], "body_part": ann["body_part"]}
        try:
            from boneaug.io.dicom import Rejection, read_xray

            image = read_xray(data, path=path, target=self.target)
            if isinstance(image, Rejection):
                return row | {"reason": image.reason, "message": image.message}
            hw = self.target
            stored_boxes = [list(map(int, b)) for b in (ann.get("boxes") or [])]
            bad = [b for b in stored_boxes
                   if not (0 <= b[0] < b[2] <= image.columns and 0 <= b[1] < b[3] <= image.rows)]
            if bad:
                return row | {"reason": "bad_annotation",
                              "message": f"{path}: box {bad[0]} lies outside the "
                                         f"{image.rows}x{image.columns} image"}
            return row | {
                "ok": True,
                "task": ann.get("task") or "lesion",
                "split": ann["split"], "label": int(ann["label"]),
                "fracture": int(ann.get("fracture") or 0), "patient_id": str(ann["patient_id"]),
                "confounders": list(ann.get("confounders") or []), "view": ann.get("view"),
                "boxes": [list(map_box(b, image.scale, image.pad_x, image.pad_y, size=hw))
                          for b in stored_boxes],
                "stored_boxes": stored_boxes,
                "height": hw[0], "width": hw[1],
                "stored_rows": image.rows, "stored_columns": image.columns,
                "scale": image.scale, "pad_x": image.pad_x, "pad_y": image.pad_y,
                "photometric": image.photometric, "sop_uid": image.sop_uid,
                "study_uid": image.study_uid,
                "descriptor": descriptor(image.pixels, self.descriptor_rows).tolist(),
                "pixels": encode_pixels(image.pixels),
            }
        except Exception as exc:  # noqa: BLE001 - one bad object must never sink the batch
            log.exception("unexpected failure decoding %s", path)
            return row | {"reason": "internal_error",
                          "message": f"{path}: {type(exc).__name__}: {exc}"}


class WriteShard:
    """Ray Data callable: {uri} -> the batch decoded (`DecodeBatch`), its good rows written as one
    shard under `images_uri`, and its RECORD_COLUMNS returned. The shard's name comes from the
    batch's first object, so a retried task rewrites the same file instead of adding one."""

    def __init__(self, decode: DecodeBatch, images_uri: str) -> None:
        self.decode = decode
        self.images_uri = images_uri

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table = self.decode(batch)
        good = table.filter(table.column("ok")).drop_columns(["ok", "reason", "message"])
        if good.num_rows:
            name = storage.shard_name(str(batch["uri"][0]))
            storage.write_parquet(storage.join(self.images_uri, name), good)
        return table.select(RECORD_COLUMNS)


@dataclass
class IngestSummary:
    run_uri: str
    listed: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    by_split_label: dict[str, int]
    confounded: int
    seconds: float
    images_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.images_per_s = self.listed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_by_reason.items()))
        splits = ", ".join(f"{k}={v}" for k, v in sorted(self.by_split_label.items()))
        return (
            f"ingest {self.run_uri}: listed {self.listed} = written {self.written} + rejected "
            f"{self.rejected}{f' ({reasons})' if reasons else ''}; {self.seconds:.1f} s, "
            f"{self.images_per_s:.1f} images/s\n"
            f"  split:label {splits}; with confounders {self.confounded}"
        )


def ingest(
    *,
    data_uri: str,
    run_uri: str,
    image: ImageConfig,
    descriptor_rows: int,
    dicom_prefix: str | None = None,
    body_part: str | None = None,
) -> IngestSummary:
    """Decode every DICOM object under `dicom_prefix` (default <data>/dicom/<body_part>) to
    shards."""
    import ray

    start = time.perf_counter()
    if dicom_prefix is None:
        if body_part is None:
            raise DataError("ingest needs a body part or an explicit DICOM prefix")
        dicom_prefix = storage.join(data_uri, "dicom", body_part)
    table = load_annotations(data_uri)
    annotations = {row["key"]: row for row in table.to_pylist()}
    files = [f for f in storage.list_files(dicom_prefix)
             if not f.rsplit("/", 1)[-1].startswith(".")]
    if not files:
        raise DataError(f"no objects under {dicom_prefix}: "
                        "check the URI (and S3 endpoint/credentials)")
    images_uri = storage.join(run_uri, "images")
    storage.remove(storage.join(images_uri, storage.MANIFEST))  # the old run is no longer complete
    storage.remove(images_uri)
    storage.remove(storage.join(run_uri, "rejects.parquet"))

    root_path = storage.filesystem(data_uri)[1]
    per_task = objects_per_task(len(files))
    ds = ray.data.from_items([{"uri": f} for f in files],
                             override_num_blocks=max(1, min(-(-len(files) // per_task), 200)))
    # an instance, not a class: plain tasks, no actor pool to start
    shard = WriteShard(DecodeBatch(annotations, root_path, image, descriptor_rows), images_uri)
    records = pa.concat_tables(ray.get(ds.map_batches(
        shard, batch_size=per_task, batch_format="numpy").to_arrow_refs()))
    ok = records.column("ok").to_numpy(zero_copy_only=False)
    rejects = records.filter(pa.array(~ok)).select(REJECT_COLUMNS)
    storage.write_parquet(storage.join(run_uri, "rejects.parquet"), rejects)

    meta = records.filter(pa.array(ok)).select(["split", "label", "confounders"]).to_pandas()
    summary = IngestSummary(
        run_uri=run_uri, listed=len(files), written=len(meta), rejected=rejects.num_rows,
        rejected_by_reason=dict(Counter(rejects.column("reason").to_pylist())),
        by_split_label={f"{k[0]}:{k[1]}": int(v)
                        for k, v in meta.groupby(["split", "label"]).size().items()},
        confounded=int(sum(len(c) > 0 for c in meta["confounders"])),
        seconds=time.perf_counter() - start,
    )
    if summary.listed != summary.written + summary.rejected:
        raise DataError(f"count mismatch: {summary}")
    storage.publish_manifest(images_uri, {"stage": "ingest", "data_uri": data_uri,
                                          "dicom_prefix": dicom_prefix, **asdict(summary)})
    return summary


def classification_filter(table: pa.Table) -> pa.Table:
    """Rows usable for classification: no confounders (paper 4.1)."""
    return table.filter(pc.equal(pc.list_value_length(table.column("confounders")), 0))
