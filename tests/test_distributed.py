"""Ray Train worker sizing against a real local Ray (2 CPUs)."""

from __future__ import annotations

import pytest

from boneaug.train.distributed import worker_resources


@pytest.mark.parametrize(("workers", "cpus", "gpu", "expected"), [
    (1, 1.0, False, {"CPU": 1.0}),                 # leaves one CPU to Ray Data: as asked
    (2, 1.0, False, {"CPU": 0.5}),                 # would take both: shrunk to share one
    (4, 1.0, True, {"CPU": 0.25, "GPU": 1.0}),
    (3, 1.0, False, {"CPU": 1 / 3}),
])
def test_train_workers_always_leave_ray_data_a_cpu(ray_session: None, workers: int, cpus: float, gpu: bool,
                                                   expected: dict[str, float]) -> None:
    got = worker_resources(workers, cpus, gpu)
    assert got == pytest.approx(expected)
    assert workers * got["CPU"] <= 2 - 1 + 1e-9
