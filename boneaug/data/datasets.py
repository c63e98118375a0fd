"""Ray Datasets over finished stages: classification splits (+ augmented rows), patch sets.

Classification sets exclude confounder images (paper 4.1) and hold only the lesion task; the
fracture corpus is its own run. Augmented rows join the training split only, never validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from boneaug import storage
from boneaug.errors import DataError

if TYPE_CHECKING:
    import ray.data

TRAIN_COLUMNS = ["image_id", "split", "label", "fracture", "task", "height", "width", "pixels"]

BLOCK_ROWS = 64  # rows per block of the classification splits

FEED_CPUS = 0.25
"""CPUs that each Ray Data task feeding Train workers (column selection) requests.

A fraction, so the feed runs in whatever the workers leave free: with the default of one CPU, a
cluster whose CPUs are reserved but for a fraction (Train workers plus anything else holding a
reservation) never schedules the feed and the run waits forever (seen on a 2-CPU head). Inputs
are therefore in the object store before training starts (`from_arrow`, or `patch_dataset`'s
materialised read: Ray Data's file listing always asks for a whole CPU)."""


def image_table(run_uri: str, *, task: str = "lesion", classification: bool = True,
                columns: Sequence[str] = TRAIN_COLUMNS) -> pa.Table:
    """The finished image shards of a run (confounder images dropped when `classification`), in
    image-id order: the shards come back in the order Ray Data's ingest tasks happened to finish,
    and every seeded draw over these rows (negatives kept, positives subset, training order) must
    be a function of the rows and the seed alone. `columns`: those to read (e.g. no pixels, to
    count rows); image_id and task are always read."""
    images_uri = storage.join(run_uri, "images")
    if storage.read_manifest(images_uri) is None:
        raise DataError(f"{images_uri} has no manifest: "
                        "ingestion did not finish (run jobs/ingest.py)")
    wanted = [*columns, *(c for c in ("image_id", "task") if c not in columns)]
    table = storage.read_parquet(images_uri, columns=[*wanted, "confounders"])
    table = table.filter(pc.equal(table.column("task"), task))
    if classification:
        table = table.filter(pc.equal(pc.list_value_length(table.column("confounders")), 0))
    return table.drop_columns(["confounders"]).sort_by("image_id")


def classification_splits(
    run_uri: str,
    *,
    augmented: pa.Table | None = None,
    task: str = "lesion",
    max_train_negatives: int | None = None,
    seed: int = 0,
    positive_fraction: float = 1.0,
    extra_positives: int = 0,
) -> dict[str, ray.data.Dataset]:
    """{"train", "val", "test"} Ray Datasets; `augmented` rows (label 1) are added to train only.

    `seed` is the data seed (`DrnConfig.data_seed`): it draws the real training negatives kept
    under `max_train_negatives`, the positives kept at `positive_fraction` (nested: a smaller
    fraction keeps a subset of a larger one's) and the `extra_positives` taken from the cohort's
    "extra" split (the learning curve's 2x and 4x points). The same seed gives the same rows to
    every model, so comparisons stay paired. The training rows are interleaved (seeded) into
    small blocks, so any worker's shard mixes augmented and real rows.
    """
    import ray.data

    table = image_table(run_uri, task=task)
    splits = {s: table.filter(pc.equal(table.column("split"), s)) for s in ("train", "val", "test")}
    train = splits["train"]
    if max_train_negatives is not None:
        train = _cap_negatives(train, max_train_negatives, seed)
    if positive_fraction < 1.0:
        train = _subset_positives(train, positive_fraction, seed)
    if extra_positives:
        train = pa.concat_tables([train, _extra_positives(table, extra_positives, seed, run_uri)])
    splits["train"] = train
    for name, part in splits.items():
        if part.num_rows == 0:
            raise DataError(f"{run_uri}: the {name} split is empty for task {task!r}")
    if augmented is not None and augmented.num_rows:
        extra = augmented.select(TRAIN_COLUMNS).cast(splits["train"].schema)
        splits["train"] = pa.concat_tables([splits["train"], extra])
    splits["train"] = _interleave(splits["train"], seed)
    return {name: ray.data.from_arrow(_blocks(part)) for name, part in splits.items()}


def patch_dataset(uri: str) -> ray.data.Dataset:
    """A finished patch set (``<run>/patches/<kind>``) as a Ray Dataset to feed Train workers, in
    patch-id order (Ray Data's parallel read returns the files' rows in the order its tasks
    finish, which made a seeded UNIT run differ from the last), held in the object store before
    training starts (see `FEED_CPUS`)."""
    import ray.data

    table = storage.read_parquet(uri).sort_by("patch_id")
    if table.num_rows == 0:
        raise DataError(f"no patches under {uri}")
    return ray.data.from_arrow(_blocks(table))


def _cap_negatives(table: pa.Table, cap: int, seed: int) -> pa.Table:
    labels = table.column("label").to_numpy()
    negatives = np.flatnonzero(labels == 0)
    if len(negatives) <= cap:
        return table
    keep = np.random.default_rng(seed).choice(negatives, size=cap, replace=False)
    return table.take(np.sort(np.concatenate([np.flatnonzero(labels != 0), keep])))


def _subset_positives(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    """Keep round(fraction x positives) of the positives (at least 1): the first of one seeded
    permutation, so the subsets of growing fractions are nested."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"positive_fraction must be in (0, 1], got {fraction}")
    labels = table.column("label").to_numpy()
    positives = np.flatnonzero(labels == 1)
    order = np.random.default_rng([seed, 1]).permutation(positives)
    keep = order[:max(1, round(fraction * len(positives)))]
    return table.take(np.sort(np.concatenate([np.flatnonzero(labels != 1), keep])))


def _extra_positives(table: pa.Table, count: int, seed: int, run_uri: str) -> pa.Table:
    """`count` positives of the cohort's "extra" split (drawn from the generator beside the
    training split, for the learning curve), the first of one seeded permutation."""
    extra = table.filter(pc.and_(pc.equal(table.column("split"), "extra"),
                                 pc.equal(table.column("label"), 1))).sort_by("image_id")
    if extra.num_rows < count:
        raise DataError(
            f"{run_uri}: the learning curve asks for {count} extra real positives, the cohort has "
            f"{extra.num_rows} (split 'extra'): generate the cohort with synth.counts.<body "
            f"part>.extra_pos >= {count}, or run the learning curve without the larger points")
    order = np.random.default_rng([seed, 2]).permutation(extra.num_rows)[:count]
    return extra.take(np.sort(order)).cast(table.schema)


def _interleave(table: pa.Table, seed: int) -> pa.Table:
    """The rows in one seeded random order (real and augmented mixed in every block)."""
    return table.take(np.random.default_rng([seed, 3]).permutation(table.num_rows))


def _blocks(table: pa.Table, rows: int = BLOCK_ROWS) -> list[pa.Table]:
    """Small blocks, so Ray Data can spread one split over several Train workers."""
    return [table.slice(i, rows) for i in range(0, max(table.num_rows, 1), rows)]
