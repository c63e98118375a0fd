"""What the Ray Train loops of UNIT and the DRN share about torch.distributed."""

from __future__ import annotations

from typing import Any


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (all_gather_object); ``[obj]`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def worker_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """Ray Train's `resources_per_worker`, leaving one CPU of the cluster to Ray Data.

    The workers' dataset shards are fed by Ray Data tasks that need a CPU each; workers that take
    every CPU of the cluster (2 workers x 1 CPU on a 2-CPU head) starve them and the run hangs.
    Such a request is shrunk to share the cluster's CPUs less one, with a warning.
    """
    import logging

    import ray

    cpus = cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total > 0 and num_workers * cpus > total - 1:
        cpus = max(total - 1, total / (num_workers + 1)) / num_workers
        logging.getLogger(__name__).warning(
            "%d Train workers x %.2g CPU leave Ray Data no CPU on this %.0f-CPU cluster: "
            "using %.2g CPU per worker (add nodes or lower --workers to avoid this)",
            num_workers, cpus_per_worker, total, cpus)
    return {"CPU": cpus} | ({"GPU": 1.0} if use_gpu else {})


def worker_threads(resources: dict[str, float], torch_threads: int | None = None) -> int:
    """Intra-op threads of one Train worker: `torch_threads`, else the whole CPUs it holds (at
    least one). Ray leaves OMP_NUM_THREADS unset for fractional CPUs, and torch would then start
    a thread per core in every worker: oversubscribed cores spin (2 UNIT workers on 2 cores ran
    at a fraction of one worker's speed)."""
    return int(torch_threads) if torch_threads else max(1, int(resources.get("CPU", 1.0)))
