"""Ray Train worker sizing against a real local Ray (2 CPUs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
