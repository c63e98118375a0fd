"""What the Ray Train loops of UNIT and the DRN share: torch.distributed collectives, worker
resources, seeds, CPU copies of weights and the checkpoint file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

CHECKPOINT_FILE = "state.pt"  # in each Ray Train checkpoint directory


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, rank, epoch or iteration, purpose)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of the state dict of `module` (of the module inside a DDP wrapper)."""
    net = getattr(module, "module", module)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def load_checkpoint() -> dict[str, Any] | None:
    """This Train run's latest checkpoint (`CHECKPOINT_FILE`, tensors only), or None."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def seeded_data_config(datasets_to_split: list[str] | None = None) -> Any:
    """Ray Train's DataConfig for a seeded run: the blocks reach the split in the datasets' own
    order (``preserve_order``) and are dealt to the workers by position, not by the node they
    happen to live on (no shard locality), so the seed alone fixes what each worker reads and
    in which order. Left to Ray's defaults, blocks arrive as their tasks finish: the same seed
    then trained a different model on every run. `datasets_to_split`: None splits all."""
    import copy

    import ray.data
    import ray.train

    # the context's options, as Ray Train's default takes them (its `default_ingest_options`
    # prints a deprecation warning of Ray's own on every call)
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=datasets_to_split or "all",
                                execution_options=options, enable_shard_locality=False)


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
