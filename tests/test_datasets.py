"""Classification splits as the DRN trainer sees them: the data seed's subsets, the learning
curve's positives, and a feed that shuffles every row, augmented or real, every epoch."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from boneaug import storage
from boneaug.data.arrays import encode_pixels
from boneaug.data.datasets import classification_splits, image_table
from boneaug.errors import DataError
from boneaug.train.classifier import epoch_batches

H, W = 8, 4
PIXELS = encode_pixels(np.zeros((H, W), np.float32))


def _rows(split: str, n: int, positives: int, prefix: str = "img") -> list[dict]:
    return [{"image_id": f"{prefix}-{split}-{i:03d}", "split": split,
             "label": np.int8(i < positives), "fracture": np.int8(0), "task": "lesion",
             "height": H, "width": W, "pixels": PIXELS, "confounders": []}
            for i in range(n)]


@pytest.fixture()
def run(tmp_path: Path) -> str:
    """A finished ingestion: 40 real training positives, 60 negatives, 30 extra positives."""
    rows = (_rows("train", 100, 40) + _rows("val", 10, 4) + _rows("test", 10, 4)
            + _rows("extra", 30, 30))
    uri = str(tmp_path / "run")
    storage.write_parquet(storage.join(uri, "images", "part-0.parquet"), pa.Table.from_pylist(rows))
    storage.publish_manifest(storage.join(uri, "images"), {"rows": len(rows)})
    return uri


def _augmented(n: int) -> pa.Table:
    return pa.Table.from_pylist(_rows("train", n, n, prefix="aug"))



def _feed(ds, *, workers: int, seed: int, rows: int) -> list[list[str]]:
    """One epoch of the trainer's feed: the split cut into `workers` shards as Ray Train cuts
    it (streaming_split, equal), each read with `epoch_batches`; the workers' image ids."""
    shards = ds.streaming_split(workers, equal=True)
    out: list[list[str]] = [[] for _ in range(workers)]

    def read(k: int) -> None:
        out[k] = [str(i) for batch in epoch_batches(shards[k], batch_size=8, shuffle_rows=rows,
                                                    seed=seed + k) for i in batch["image_id"]]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def _positions(order: list[str]) -> np.ndarray:
    """Where the augmented rows fall in one worker's epoch, as a share of it."""
    return np.array([k for k, i in enumerate(order) if i.startswith("aug")]) / (len(order) - 1)


def test_every_worker_sees_its_share_of_augmented_rows_spread_over_the_epoch(
        run: str, ray_session) -> None:
    # the augmented rows come after the real ones in the table the trainer is given: in one
    # block, Ray's equal split gave the first worker only real rows and the second all the
    # augmented ones, every epoch
    splits = classification_splits(run, augmented=_augmented(60), seed=0)
    first, second = _feed(splits["train"], workers=2, seed=11, rows=80)
    assert len(set(first) | set(second)) == 160
    for order in (first, second):
        where = _positions(order)
        assert 20 <= where.size <= 40  # about half of the 60 each
        assert 0.3 < where.mean() < 0.7 and (where < 0.4).sum() >= 5
    (again,) = _feed(splits["train"], workers=1, seed=11, rows=160)
    (other,) = _feed(splits["train"], workers=1, seed=12, rows=160)
    assert again != other  # a new order every epoch (the seed mixes in the epoch)
    assert _feed(splits["train"], workers=1, seed=11, rows=160)[0] == again  # the seed fixes it
    assert 0.35 < _positions(again).mean() < 0.65


def test_the_data_seed_fixes_the_negatives_and_nests_the_positive_shares(
        run: str, ray_session) -> None:
    def train(**kw) -> set[str]:
        df = classification_splits(run, max_train_negatives=20, **kw)["train"].to_pandas()
        return set(df["image_id"])

    full, again, other = train(seed=3), train(seed=3), train(seed=4)
    assert full == again and full != other  # the negative subset follows the data seed
    negatives = {i for i in full if int(i.split("-")[-1]) >= 40}
    assert len(negatives) == 20
    quarter, half = train(seed=3, positive_fraction=0.25), train(seed=3, positive_fraction=0.5)
    pos = {i for i in full if int(i.split("-")[-1]) < 40}
    assert len(pos) == 40 and len(quarter - negatives) == 10 and len(half - negatives) == 20
    assert quarter - negatives < half - negatives < pos  # nested shares, the same negatives
    assert quarter & negatives == negatives


def test_extra_positives_come_from_the_extra_split_and_are_counted(
        run: str, ray_session) -> None:
    df = classification_splits(run, seed=0, extra_positives=20)["train"].to_pandas()
    extra = df[df["image_id"].str.contains("extra")]
    assert len(extra) == 20 and (extra["label"] == 1).all() and len(df) == 120
    plain = classification_splits(run, seed=0)["train"].to_pandas()
    assert not plain["image_id"].str.contains("extra").any()  # nobody else sees them
    with pytest.raises(DataError, match="extra_pos >= 31"):
        classification_splits(run, seed=0, extra_positives=31)


def test_train_positives_counts_without_reading_pixels(run: str) -> None:
    from boneaug.workflow import train_positives

    assert train_positives(run) == 40  # the extra split's 30 are not the cohort's
    counted = image_table(run, columns=["split", "label"])
    assert counted.column_names == ["split", "label", "image_id", "task"]
    assert counted.column("image_id").equals(image_table(run).column("image_id"))


def test_the_splits_and_the_feed_do_not_depend_on_the_order_the_shards_were_written(
        tmp_path: Path, ray_session) -> None:
    # ingest writes its shards in whatever order Ray Data's tasks finish: two runs of the same
    # cohort hold the same rows in different files and orders. The kept negatives, the positive
    # share and the training order must come out the same, or a fixed seed is not reproducible
    rows = _rows("train", 100, 40) + _rows("val", 10, 4) + _rows("test", 10, 4)
    order = np.random.default_rng(5).permutation(len(rows))

    def ingested(name: str, chunks: list[list[dict]]) -> str:
        uri = str(tmp_path / name)
        for k, chunk in enumerate(chunks):
            storage.write_parquet(storage.join(uri, "images", f"part-{k}.parquet"),
                                  pa.Table.from_pylist(chunk))
        storage.publish_manifest(storage.join(uri, "images"), {"rows": len(rows)})
        return uri

    first = ingested("first", [rows[:60], rows[60:]])
    second = ingested("second", [[rows[i] for i in order[:30]], [rows[i] for i in order[30:]]])

    def fed(uri: str) -> list[str]:
        splits = classification_splits(uri, augmented=_augmented(10), seed=2)
        return _feed(splits["train"], workers=1, seed=7, rows=64)[0]

    assert len(fed(first)) == 110
    assert fed(first) == fed(second)
    # the fracture pre-training reads the table as is
    assert image_table(first).equals(image_table(second))
