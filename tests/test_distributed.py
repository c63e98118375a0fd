"""Ray Train worker sizing against a real local Ray (2 CPUs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from boneaug.train.distributed import worker_resources


@pytest.mark.parametrize(("workers", "cpus", "gpu", "expected"), [
    (1, 1.0, False, {"CPU": 1.0}),                 # leaves one CPU to Ray Data: as asked
    (2, 1.0, False, {"CPU": 0.5}),                 # would take both: shrunk to share one
    (4, 1.0, True, {"CPU": 0.25, "GPU": 1.0}),
    (3, 1.0, False, {"CPU": 1 / 3}),
])
def test_train_workers_always_leave_ray_data_a_cpu(ray_session: None, workers: int, cpus: float,
                                                   gpu: bool, expected: dict[str, float]) -> None:
    got = worker_resources(workers, cpus, gpu)
    assert got == pytest.approx(expected)
    assert workers * got["CPU"] <= 2 - 1 + 1e-9


def test_the_train_feed_runs_when_all_but_a_fraction_of_the_cpus_are_reserved(
    ray_session: None, tmp_path: Path
) -> None:
    """Regression: 2 UNIT workers held 1 of the 2 CPUs, something else held 0.25, and the feed's
    one-CPU tasks (Parquet file listing, column selection) never started: the run hung in CI.
    Here placement groups hold the same CPUs while the feed runs as the Train loops build it."""
    import pyarrow as pa
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from boneaug import storage
    from boneaug.data.datasets import FEED_CPUS, patch_dataset

    rows = pa.table({"patch_id": [f"p{i}" for i in range(8)], "height": [4] * 8})
    storage.write_parquet(str(tmp_path / "lesion" / "part-0.parquet"), rows)
    ds = patch_dataset(str(tmp_path / "lesion"))
    held = [placement_group([{"CPU": 1.0}]), placement_group([{"CPU": 0.25}])]
    ray.get([pg.ready() for pg in held], timeout=30)
    pool = ThreadPoolExecutor(1)  # a starved feed fails the test instead of hanging it
    try:
        feed = ds.select_columns(["patch_id"], num_cpus=FEED_CPUS)
        got = sorted(r["patch_id"] for r in pool.submit(feed.take_all).result(timeout=60))
    finally:
        for pg in held:  # lets a starved feed finish, so the pool's thread ends
            remove_placement_group(pg)
        pool.shutdown(wait=False)
    assert got == [f"p{i}" for i in range(8)]


def _late_first_range() -> Any:
    """ray.data.range(96) in 6 blocks of 16 whose tasks all run at once and finish last-first."""
    import time

    import ray.data

    def late_first(batch: dict) -> dict:
        time.sleep(0.3 * (5 - int(batch["id"][0]) // 16))
        return batch

    return ray.data.range(96, override_num_blocks=6).map_batches(
        late_first, batch_size=None, num_cpus=0.25)


def test_the_seeded_train_feed_deals_blocks_in_dataset_order_however_tasks_finish(
    ray_session: None, tmp_path: Path
) -> None:
    """Regression: Ray Train's default feed hands blocks to the workers as their tasks finish,
    so a seeded run read its rows in another order each time (UNIT's weights after 20
    iterations of two identical runs differed in every tensor). With `seeded_data_config` the
    workers read the rows by position, whatever the scheduling, and the same shard every run."""
    import numpy as np
    import pyarrow as pa

    from boneaug import storage
    from boneaug.data.datasets import patch_dataset
    from boneaug.train.distributed import seeded_data_config

    def fed(workers: int) -> list[list[int]]:
        ds = _late_first_range()
        splits = seeded_data_config().configure({"train": ds}, world_size=workers,
                                                worker_handles=None, worker_node_ids=None)
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(
                lambda s: [int(i) for b in s["train"].iter_batches(batch_size=None)
                           for i in b["id"]], splits))

    (alone,) = fed(1)
    assert alone == list(range(96))
    first, second = fed(2)
    assert sorted(first + second) == list(range(96)) and len(first) == len(second) == 48
    assert [first, second] == fed(2)

    # a patch set reads in patch-id order, however its rows are spread over files
    ids = [f"p{i:02d}" for i in np.random.default_rng(0).permutation(20)]
    for k in range(4):
        storage.write_parquet(str(tmp_path / "set" / f"part-{k}.parquet"),
                              pa.table({"patch_id": ids[5 * k:5 * k + 5]}))
    read = patch_dataset(str(tmp_path / "set")).take_all()
    assert [r["patch_id"] for r in read] == sorted(ids)


def _read_order(train_loop_config: dict) -> None:
    """A Train loop that publishes the ids its "train" shard yields, in the order it yields them
    through the trainers' seeded whole-shard shuffle buffer."""
    import ray.train

    from boneaug import storage
    from boneaug.train.classifier import epoch_batches

    loop = train_loop_config["loop"]
    shard = ray.train.get_dataset_shard("train")
    plain = [int(i) for b in shard.iter_batches(batch_size=None) for i in b["id"]]
    shuffled = [int(i) for b in epoch_batches(shard, batch_size=8, shuffle_rows=97, seed=3)
                for i in b["id"]]
    storage.publish_manifest(loop.run_uri, {"plain": plain, "shuffled": shuffled})


def test_a_local_mode_run_reads_its_rows_in_dataset_order_however_tasks_finish(
    ray_session: None, tmp_path: Path
) -> None:
    """Regression: Ray Train's local mode (num_workers=0, the `local` profile's trainings) hands
    the datasets to the loop as they are, without the DataConfig, so their blocks arrived as
    their tasks finished: the whole-shard shuffle buffer then permuted another row order, and a
    seeded DRN trained beside a busy test suite scored 0.02 AUC away from the same seed idle."""
    from boneaug.train.distributed import WorkerLoop, Workers, run_ray_train

    def fed(name: str) -> dict:
        ds = _late_first_range()
        run = str(tmp_path / name)
        loop = WorkerLoop(run_uri=run, tracking_uri="", mlflow_run_id="")
        return run_ray_train(_read_order, loop, workers=Workers(num_workers=0),
                             storage_uri=f"{run}/ray", datasets={"train": ds})

    first = fed("a")
    assert first["plain"] == list(range(96))
    assert sorted(first["shuffled"]) == list(range(96)) and first["shuffled"] != list(range(96))
    assert fed("b")["shuffled"] == first["shuffled"]
