"""What the UNIT and DRN trainers share: where a training publishes (`Publish`), how it runs on
the cluster (`Workers`), the Ray Train run itself (`run_ray_train`) and the finished-run check
around it; inside the loops, torch.distributed collectives, seeds, CPU copies of weights and the
checkpoint file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from boneaug.config import BoneaugConfig, TrackingConfig

CHECKPOINT_FILE = "state.pt"  # in each Ray Train checkpoint directory
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Publish:
    """Where one training's outputs go: its storage folder, its MLflow run, its registry entry.

    `run_uri` holds the Ray checkpoints, the final weights and the manifest; a finished run there
    is returned as is unless `overwrite`. `registered_name` None logs the model to MLflow only.
    `run_name` defaults to the registered name (or the trainer's kind) and the folder's name;
    `mlflow_run_id` continues an existing run (a Tune trial's) instead of starting one.
    """

    run_uri: str
    experiment: str
    registered_name: str | None = None
    alias: str | None = None
    run_name: str | None = None
    tracking: TrackingConfig | None = None
    overwrite: bool = False
    mlflow_run_id: str | None = None

    def name(self, kind: str, folder: str) -> str:
        """The MLflow run name: `run_name`, else ``<registered name or kind>-<folder's name>``."""
        return self.run_name or f"{self.registered_name or kind}-{Path(folder.rstrip('/')).name}"


@dataclass(frozen=True)
class Workers:
    """How a training runs on the cluster: Ray Train's workers, their CPUs and threads, and the
    retries from the last checkpoint."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    max_failures: int = 2

    @classmethod
    def from_config(cls, config: BoneaugConfig, *, at_least: int = 0) -> Workers:
        """The config's compute section (`at_least`: the fewest workers the trainer takes)."""
        c = config.compute
        return cls(num_workers=max(at_least, c.num_workers), use_gpu=c.use_gpu,
                   cpus_per_worker=c.cpus_per_worker, torch_threads=c.torch_threads,
                   max_failures=c.max_failures)


@dataclass(frozen=True, kw_only=True)
class WorkerLoop:
    """What a trainer's Ray Train workers get, built on the driver (each trainer extends it with
    its own fields): where rank 0 publishes, and the threads each worker runs."""

    run_uri: str
    tracking_uri: str
    mlflow_run_id: str
    registered_name: str | None = None
    alias: str | None = None
    s3_endpoint: str | None = None
    torch_threads: int = 1


def finished_run(uri: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a training already finished under `uri` (None: train). `overwrite`
    removes whatever is there first."""
    from boneaug import storage

    if overwrite:
        storage.remove(uri)
        return None
    done = storage.read_manifest(uri)
    if done is not None:
        log.info("%s already finished; returning its result (overwrite=True retrains)", uri)
    return done


def run_ray_train(
    loop_fn: Callable[[dict[str, Any]], Any],
    loop: WorkerLoop,
    *,
    workers: Workers,
    storage_uri: str,
    datasets: Mapping[str, Any],
    split: list[str] | None = None,
) -> dict[str, Any]:
    """Run `loop_fn({"loop": loop})` on Ray Train's workers (DDP), Ray checkpoints under
    `storage_uri` (the last 2 kept; a run there resumes from them), then return the manifest the
    loop published in ``dirname(storage_uri)``. `split`: the datasets sharded over the workers
    (None: all)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from boneaug import storage
    from boneaug.errors import ModelError
    from boneaug.progress import train_logging

    resources = worker_resources(workers.num_workers, workers.cpus_per_worker, workers.use_gpu)
    loop = replace(loop, torch_threads=worker_threads(resources, workers.torch_threads))
    parent, name = storage_uri.rstrip("/").rsplit("/", 1)
    fs, path = storage.pyarrow_filesystem(parent)
    TorchTrainer(
        loop_fn,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers,
                                               use_gpu=workers.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
            logging_config=train_logging(),
        ),
        datasets=(dict(datasets) if workers.num_workers else
                  {name: in_order(ds) for name, ds in datasets.items()}),
        dataset_config=seeded_data_config(split),
    ).fit()
    done = storage.read_manifest(parent)
    if done is None:
        raise ModelError(f"training finished but published no manifest under {parent}")
    return done


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


def in_order(ds: Any) -> Any:
    """`ds` delivering its blocks in the dataset's own order (``preserve_order``), what
    `seeded_data_config` sets for Train workers: Ray Train's local mode (``num_workers=0``) hands
    the datasets to the loop as they are, without their DataConfig, and blocks then arrived as
    their tasks finished, so the same seed fed another row order whenever the machine was busy."""
    import ray.data

    ordered = ray.data.Dataset.copy(ds, _deep_copy=True)  # its own DataContext, not the caller's
    ordered.context.execution_options.preserve_order = True
    return ordered


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
