"""Ray Datasets over finished stages: classification splits (+ augmented rows), patch sets.

Classification sets exclude confounder images (paper 4.1) and hold only the lesion task; the
fracture corpus is its own run. Augmented rows join the training split only, never validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from boneaug import storage
from boneaug.errors import DataError

if TYPE_CHECKING:
    import ray.data

TRAIN_COLUMNS = ["image_id", "split", "label", "fracture", "task", "height", "width", "pixels"]

FEED_CPUS = 0.25
"""CPUs that each Ray Data task feeding Train workers (column selection) requests.

A fraction, so the feed runs in whatever the workers leave free: with the default of one CPU, a
cluster whose CPUs are reserved but for a fraction (Train workers plus anything else holding a
reservation) never schedules the feed and the run waits forever (seen on a 2-CPU head). Inputs
are therefore in the object store before training starts (`from_arrow`, or `patch_dataset`'s
materialised read: Ray Data's file listing always asks for a whole CPU)."""


def image_table(run_uri: str, *, task: str = "lesion", classification: bool = True) -> pa.Table:
    """The finished image shards of a run (confounder images dropped when `classification`)."""
    images_uri = storage.join(run_uri, "images")
    if storage.read_manifest(images_uri) is None:
        raise DataError(f"{images_uri} has no manifest: "
                        "ingestion did not finish (run jobs/ingest.py)")
    table = storage.read_parquet(images_uri, columns=[*TRAIN_COLUMNS, "confounders"])
    table = table.filter(pc.equal(table.column("task"), task))
    if classification:
        table = table.filter(pc.equal(pc.list_value_length(table.column("confounders")), 0))
    return table.drop_columns(["confounders"])


def classification_splits(
    run_uri: str,
    *,
    augmented: pa.Table | None = None,
    task: str = "lesion",
    max_train_negatives: int | None = None,
    seed: int = 0,
) -> dict[str, ray.data.Dataset]:
    """{"train", "val", "test"} Ray Datasets; `augmented` rows (label 1) are added to train only.

    `max_train_negatives` keeps a seeded random subset of the real training negatives, the same
    subset for every model trained with the same seed, so comparisons stay paired.
    """
    import ray.data

    table = image_table(run_uri, task=task)
    splits = {s: table.filter(pc.equal(table.column("split"), s)) for s in ("train", "val", "test")}
    if max_train_negatives is not None:
        splits["train"] = _cap_negatives(splits["train"], max_train_negatives, seed)
    for name, part in splits.items():
        if part.num_rows == 0:
            raise DataError(f"{run_uri}: the {name} split is empty for task {task!r}")
    if augmented is not None and augmented.num_rows:
        extra = augmented.select(TRAIN_COLUMNS).cast(splits["train"].schema)
        splits["train"] = pa.concat_tables([splits["train"], extra])
    return {name: ray.data.from_arrow(part) for name, part in splits.items()}


def patch_dataset(uri: str) -> ray.data.Dataset:
    """A finished patch set (``<run>/patches/<kind>``) as a Ray Dataset to feed Train workers:
    read now, across the cluster, into the object store (see `FEED_CPUS`)."""
    import ray.data

    fs, path = storage.pyarrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"]).materialize()


def _cap_negatives(table: pa.Table, cap: int, seed: int) -> pa.Table:
    table = table.sort_by("image_id")
    labels = table.column("label").to_numpy()
    negatives = np.flatnonzero(labels == 0)
    if len(negatives) <= cap:
        return table
    keep = np.random.default_rng(seed).choice(negatives, size=cap, replace=False)
    return table.take(np.sort(np.concatenate([np.flatnonzero(labels != 0), keep])))
