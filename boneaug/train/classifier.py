"""DRN classifier training (paper 4.2): data, augmentation, step functions, Ray Train loop, MLflow.

Choices the paper leaves open, and why:

- Class imbalance: weighted BCE with ``pos_weight = negatives / positives`` of the training set,
  not a balanced sampler. With 16-70 positives against hundreds to thousands of negatives, a
  balanced sampler repeats each positive tens of times per epoch, needs a global index over a
  sharded, streamed Ray Dataset, and changes what "an epoch" means between body parts. The
  weighted loss has the same expected gradient as balanced sampling, sees every image once per
  epoch and works unchanged on each worker's streaming shard. Scores are therefore calibrated to
  a balanced prior (0.5 = equal evidence), which is what the pseudo-labelling threshold t and the
  validation operating point are chosen on; AUC itself does not depend on it.
- Fine-tuning: with `init_from`, the backbone comes from the auxiliary fracture model, the head is
  re-initialised (a fracture logit means nothing for lesions) and only the last
  ``DrnConfig.finetune_blocks`` stages (of the DRN's 8) and the head train; frozen stages keep
  their BatchNorm statistics (see `boneaug.models.drn`). Without `init_from` everything trains.
  The paper's regime (2 stages, Adam lr 1e-4, x0.9 on plateau) is the `paper` profile's; on the
  `local` cohort it does not learn (the network only re-reads its fracture features), so the
  `local` profile trains every stage, the fresh head at ``head_lr``, with a warm-up, a cosine
  decay and an EMA of the weights (`DrnConfig`, and the measurements in `boneaug.config`).
- Weight averaging: with ``ema_decay`` the EMA (weights and BatchNorm statistics) is updated
  after every step; validation scores it, the best epoch is chosen by it, and it is what is
  published. Its averaging over ~1/(1 - decay) steps removes most of the epoch-to-epoch
  jitter of a network that really moves.
- ``DrnConfig.batch_size`` is the global batch (the paper's hyper-parameter); each of the
  ``num_workers`` DDP workers takes ``batch_size // num_workers`` (at least 1).
- Validation and test rows are not split by Ray: every worker reads them and scores the rows
  whose ``crc32(image_id) % world_size`` is its rank, then the scores are all-gathered. Every row
  is scored exactly once (Ray's equal split may drop rows; that is fine for training only) and
  every rank computes the same AUC, so plateau and early-stopping decisions agree across ranks.
  Before each evaluation every rank takes rank 0's BatchNorm statistics (DDP averages gradients
  but leaves buffers per rank), so all ranks score with the model rank 0 saves.
- Augmentation (train only): small random affine (rotation, isotropic scale, translation) and a
  horizontal flip (left and right long bones are mirror images), drawn from a torch Generator
  seeded by (seed, rank, epoch), so a resumed run repeats the same draws.
- Feed order: every epoch each worker reads its shard through a shuffle buffer as large as the
  shard, seeded by (seed, rank, epoch): a fresh permutation of all its rows, augmented and real,
  whatever the block layout (`epoch_batches`). `classification_splits` interleaves the rows into
  small blocks, so every worker's shard holds its share of the augmented rows.

Outputs under `run_uri`: ``ray/`` (Ray Train checkpoints every epoch: model, optimiser,
scheduler, epoch, best AUC and best weights; Train's local mode, ``num_workers=0``, keeps them in
memory only, so it cannot resume), ``best_model.pt`` (best-by-val-AUC state dict),
``predictions.parquet`` (image_id, split, label, score for val and test) and ``_MANIFEST.json``
last. The MLflow run (created by the driver, written to by rank 0) holds the DrnConfig and data
counts as params, per-epoch ``train_loss`` / ``val_auc`` / ``lr``, and the best model, registered
under `registered_name` when one is given.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from boneaug import storage, tracking
from boneaug.augment.pseudolabel import score_images
from boneaug.config import DrnConfig, TrackingConfig
from boneaug.data.arrays import decode_pixels
from boneaug.data.datasets import FEED_CPUS
from boneaug.errors import DataError, ModelError
from boneaug.eval.metrics import roc_auc
from boneaug.models.drn import DRN, build_drn
from boneaug.models.precision import autocast
from boneaug.progress import Progress, quiet_ray
from boneaug.train.distributed import (
    CHECKPOINT_FILE,
    Publish,
    WorkerLoop,
    Workers,
    cpu_state,
    finished_run,
    gather,
    load_checkpoint,
    run_ray_train,
    seed_for,
)

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

FRACTURE_MODEL = "boneaug-drn-fracture"
BEST_MODEL_FILE = "best_model.pt"
PREDICTIONS_FILE = "predictions.parquet"
_ROW_COLUMNS = ("image_id", "height", "width", "pixels")


# ---- metrics ---------------------------------------------------------------------------------
def _val_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Validation AUC, NaN when the split holds one class only (nothing to rank)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return roc_auc(labels, scores)


# ---- data ------------------------------------------------------------------------------------
def batch_to_arrays(
    batch: Mapping[str, Any], *, label_column: str, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A Ray Data numpy batch of shard rows -> images (B, 1, H, W) float32, labels (B,), ids."""
    height, width = image_size
    hs, ws = np.asarray(batch["height"]), np.asarray(batch["width"])
    if hs.size and (np.any(hs != height) or np.any(ws != width)):
        bad = int(np.flatnonzero((hs != height) | (ws != width))[0])
        raise DataError(
            f"image {batch['image_id'][bad]!r} is {hs[bad]}x{ws[bad]}, the classifier expects "
            f"{height}x{width}: re-run ingest with the same profile as training (image size)"
        )
    images = np.stack([decode_pixels(bytes(p), height, width) for p in batch["pixels"]])
    labels = np.asarray(batch[label_column], dtype=np.float32)
    if labels.size and not np.isin(labels, (0.0, 1.0)).all():
        raise DataError(f"column {label_column!r} must hold 0/1 labels, got {np.unique(labels)}")
    ids = [str(i) for i in batch["image_id"]]
    return images[:, None].astype(np.float32, copy=False), labels, ids


def _take(batch: Mapping[str, Any], index: Sequence[int]) -> dict[str, Any]:
    return {k: np.asarray(v)[list(index)] for k, v in batch.items()}


def owner_rank(image_id: str, world_size: int) -> int:
    """The rank that scores `image_id` during evaluation (stable across processes and runs)."""
    return zlib.crc32(image_id.encode()) % world_size



@dataclass(frozen=True)
class AffineAugment:
    """Linear-transform augmentation for upright long-bone radiographs (train only).

    Per image: rotation in +-`degrees`, isotropic scale in `scale`, translation up to
    `translate` of each side, horizontal flip with probability `hflip`; background fill 0 (air).
    """

    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    hflip: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.degrees <= 180 and 0 < self.scale[0] <= self.scale[1]
                and 0 <= self.translate < 0.5 and 0 <= self.hflip <= 1):
            raise ValueError(f"invalid augmentation settings {self}")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), each image with its own draw from `generator`."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        _, _, height, width = images.shape
        u = torch.rand((images.shape[0], 5), generator=generator, dtype=torch.float64).tolist()
        out = []
        for img, (ua, us, ux, uy, uf) in zip(images, u, strict=True):
            angle = (2 * ua - 1) * self.degrees
            scale = self.scale[0] + us * (self.scale[1] - self.scale[0])
            shift = [round((2 * ux - 1) * self.translate * width),
                     round((2 * uy - 1) * self.translate * height)]
            img = TF.affine(img, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.BILINEAR, fill=[0.0])
            out.append(TF.horizontal_flip(img) if uf < self.hflip else img)
        return torch.stack(out)


# ---- model, optimiser, steps -----------------------------------------------------------------
def build_model(config: DrnConfig, *, generator: torch.Generator | None = None) -> DRN:
    """The configured DRN with one input channel and one (lesion / fracture) logit."""
    return build_drn(config.arch, num_classes=1, in_channels=1, width_mult=config.width_mult,
                     downsample=config.downsample,
                     generator=generator)


def make_optimizer(model: nn.Module, config: DrnConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters (L2 weight decay, as in the paper); the head (``fc``)
    is its own group at ``config.head_lr`` when one is set."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not n.startswith("fc.")], "lr": config.lr},
              {"params": [p for n, p in named if n.startswith("fc.")],
               "lr": config.head_lr or config.lr}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=config.lr,
                            weight_decay=config.weight_decay)


class LrSchedule:
    """The lr policy of `config.schedule`, stepped per batch and per epoch by the loop.

    cosine: linear warm-up over ``warmup_epochs`` then cosine decay to 0 at ``epochs`` (a
    LambdaLR, per step). plateau: the paper's ``lr x lr_decay`` after ``plateau_patience``
    epochs without a better val AUC (ReduceLROnPlateau, per epoch); none when lr_decay is 1.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: DrnConfig, *,
                 steps_per_epoch: int, epochs: int) -> None:
        self.scheduler: Any = None
        if config.schedule == "cosine":
            warmup = config.warmup_epochs * steps_per_epoch
            total = max(1, epochs * steps_per_epoch)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: _cosine_factor(step, warmup, total))
        elif config.lr_decay < 1.0:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=config.lr_decay, patience=config.plateau_patience)

    def after_batch(self) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            self.scheduler.step()

    def after_epoch(self, val_auc: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_auc if math.isfinite(val_auc) else 0.0)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)


def _cosine_factor(step: int, warmup: float, total: int) -> float:
    """lr factor at `step`: linear warm-up to 1 over `warmup` steps, then cosine to 0 at
    `total` (and 0 beyond)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: DrnConfig, *,
                   steps_per_epoch: int = 1, epochs: int | None = None) -> LrSchedule:
    """The configured lr policy (`LrSchedule`)."""
    return LrSchedule(optimizer, config, steps_per_epoch=steps_per_epoch,
                      epochs=epochs or config.epochs)


def make_ema(model: nn.Module, config: DrnConfig) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and BatchNorm statistics, updated
    after every optimiser step (None when ``config.ema_decay`` is off)."""
    if config.ema_decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                         use_buffers=True)


def make_loss(pos_weight: float, device: torch.device | str = "cpu") -> nn.BCEWithLogitsLoss:
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device))


def _to_device(images: np.ndarray | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(images, dtype=torch.float32).to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    max_grad_norm: float | None = None,
) -> float:
    """One optimiser step on a batch already on the model's device, the gradients' global norm
    clipped to `max_grad_norm` when given; returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device):
        logits = model(images)  # (B, 1)
    loss = loss_fn(logits[:, 0].float(), labels)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


predict = score_images  # lesion probabilities (N,) of images (N, 1, H, W): one implementation


@dataclass
class TrainState:
    """What a checkpoint restores besides the model, optimiser and scheduler."""

    epoch: int = -1  # last finished epoch
    best_auc: float = -math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    stopped: bool = False
    train_losses: list[float] = field(default_factory=list)  # per finished epoch
    val_aucs: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        """The train loss ended no lower than it started: the run fell apart (seen: a network
        whose output went constant at lr 1e-3, its val AUC 0.52), rather than learned."""
        return len(self.train_losses) > 1 and self.train_losses[-1] >= self.train_losses[0]

    @property
    def unlearned(self) -> bool:
        """The kept model validates no better than epoch 1's: the training taught it nothing
        that shows on validation (seen: a 67-positive humerus baseline whose val AUC went 0.689
        -> 0.623 while its train loss fell 11 %, which `diverged` does not catch)."""
        return len(self.val_aucs) > 1 and not self.best_auc > self.val_aucs[0]

    def update(self, epoch: int, auc: float, *, latest: bool = False,
               loss: float | None = None) -> bool:
        """Record epoch `epoch`'s val AUC (and train `loss`); True when this epoch's model is now
        the one kept: the best so far, or with `latest` (``DrnConfig.checkpoint == "last"``)
        every epoch (``best_*`` then describe the kept, last model)."""
        self.epoch = epoch
        self.val_aucs.append(auc)
        if loss is not None:
            self.train_losses.append(loss)
        if latest or auc > self.best_auc:  # NaN never wins
            self.best_auc, self.best_epoch, self.epochs_since_best = auc, epoch, 0
            return True
        self.epochs_since_best += 1
        return False

    def should_stop(self, config: DrnConfig) -> bool:
        """Early stopping: `early_stop_patience` epochs in a row without a better val AUC.
        (The epoch limit is not recorded here, so a finished run can be resumed for longer.)"""
        return self.epochs_since_best >= config.early_stop_patience



# ---- initialisation from the auxiliary model ------------------------------------------------
def load_init_state(
    init_from: str, *, tracking_config: TrackingConfig | None = None
) -> dict[str, Tensor]:
    """A DRN state dict from a registered/logged model (``models:/``, ``runs:/``), a
    ``best_model.pt`` file, a Ray checkpoint directory or a `fit_classifier` run URI."""
    if init_from.startswith(("models:/", "runs:/")):
        return cpu_state(tracking.load_torch_model(init_from, tracking=tracking_config))
    candidates = [init_from, storage.join(init_from, BEST_MODEL_FILE),
                  storage.join(init_from, CHECKPOINT_FILE)]
    for uri in candidates:
        if _is_file(uri):
            obj = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                             weights_only=True)
            if isinstance(obj, dict) and "best_model" in obj:  # a training checkpoint
                obj = obj["best_model"]
            if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
                raise ModelError(f"{uri} holds no DRN state dict (got {type(obj).__name__})")
            return obj
    raise ModelError(
        f"cannot initialise from {init_from!r}: not a models:/ or runs:/ URI and none of "
        f"{candidates} exists. Run the fracture pre-training first or fix the URI."
    )


def _is_file(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    try:
        return bool(fs.isfile(path))
    except Exception:  # noqa: BLE001 - unreachable or malformed: not a file we can use
        return False


def apply_init(model: DRN, state: Mapping[str, Tensor], *, keep_head: bool = False) -> DRN:
    """Copy a pre-trained backbone (and the head if `keep_head`) into `model`."""
    wanted = {k: v for k, v in state.items() if keep_head or not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(wanted, strict=False)
    except RuntimeError as exc:
        raise ModelError(
            f"pre-trained weights do not fit this DRN ({model.arch}, {model.out_channels} final "
            f"channels): {str(exc)[:500]}. Pre-train with the same arch and width_mult."
        ) from exc
    missing = [k for k in missing if keep_head or not k.startswith("fc.")]
    if missing or unexpected:
        raise ModelError(
            f"pre-trained weights do not fit this DRN: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Pre-train with the same arch and width_mult."
        )
    return model


# ---- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierResult:
    best_val_auc: float
    best_epoch: int
    epochs_run: int
    model_version: str | None
    model_uri: str
    predictions_uri: str
    best_weights_uri: str
    mlflow_run_id: str
    run_uri: str
    train_losses: tuple[float, ...] = ()  # per epoch run (manifests before them: empty)
    val_aucs: tuple[float, ...] = ()

    @classmethod
    def from_manifest(cls, content: Mapping[str, Any]) -> ClassifierResult:
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in content.items() if k in cls.__dataclass_fields__})


def load_best_model(result_or_uri: ClassifierResult | str, config: DrnConfig) -> DRN:
    """The best-by-val-AUC model of a finished run (from its ``best_model.pt``), eval mode, CPU."""
    uri = (result_or_uri.best_weights_uri if isinstance(result_or_uri, ClassifierResult)
           else result_or_uri)
    model = build_model(config)
    model.load_state_dict(load_init_state(uri))
    return model.eval()


# ---- Ray Train: the per-worker loop ------------------------------------------------------------
def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP syncs gradients, not buffers), so
    that all ranks evaluate, and rank 0 saves, one and the same model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in getattr(model, "module", model).buffers():
            dist.broadcast(buffer, src=0)


def _score_split(
    model: nn.Module,
    shard: Any,  # ray.data.DataIterator over the whole split
    *,
    label_column: str,
    image_size: tuple[int, int],
    batch_size: int,
    rank: int,
    world_size: int,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, labels, scores) of every row of the split, gathered on every rank."""
    ids: list[str] = []
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        mine = [i for i, iid in enumerate(batch["image_id"])
                if owner_rank(str(iid), world_size) == rank]
        if not mine:
            continue
        images, y, batch_ids = batch_to_arrays(_take(batch, mine), label_column=label_column,
                                               image_size=image_size)
        ids += batch_ids
        labels.append(y)
        scores.append(predict(model, images, batch_size=batch_size))
    parts = gather((ids, np.concatenate(labels) if labels else np.zeros(0, np.float32),
                     np.concatenate(scores) if scores else np.zeros(0, np.float32)))
    all_ids = [i for p in parts for i in p[0]]
    order = np.argsort(all_ids, kind="stable")
    return ([all_ids[i] for i in order], np.concatenate([p[1] for p in parts])[order],
            np.concatenate([p[2] for p in parts])[order])


def validates(epoch: int, epochs: int, every: int) -> bool:
    """Whether 0-based `epoch` of `epochs` is validated: the first, every `every`-th, the last."""
    return epoch == 0 or (epoch + 1) % every == 0 or epoch == epochs - 1


def epoch_batches(shard: Any, *, batch_size: int, shuffle_rows: int,
                  seed: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of a worker's training shard in a fresh random order: the shuffle buffer holds
    the whole shard (`shuffle_rows`), so every row, augmented or real, can land anywhere in the
    epoch whatever the block layout, and the order is a function of `seed` alone."""
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                              local_shuffle_buffer_size=max(shuffle_rows, batch_size),
                              local_shuffle_seed=seed)


def _train_epoch(
    model: nn.Module,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    steps: TrainSteps,
    generator: torch.Generator,
    device: torch.device,
    label_column: str,
    image_size: tuple[int, int],
) -> float:
    """Mean training loss over this epoch, across all ranks (weighted by batch size)."""
    total, count = 0.0, 0
    for batch in batches:
        images, labels, _ = batch_to_arrays(batch, label_column=label_column, image_size=image_size)
        x = steps.augment(_to_device(images, device), generator)
        y = torch.as_tensor(labels, device=device)
        total += train_step(model, x, y, optimizer=steps.optimizer, loss_fn=steps.loss_fn,
                            max_grad_norm=steps.max_grad_norm) * len(labels)
        count += len(labels)
        steps.schedule.after_batch()
        if steps.ema is not None:
            steps.ema.update_parameters(getattr(model, "module", model))
    parts = gather((total, count))
    n = sum(c for _, c in parts)
    return sum(t for t, _ in parts) / max(n, 1)


@dataclass
class TrainSteps:
    """What one optimisation step uses besides the model and the batch."""

    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    loss_fn: nn.Module
    augment: AffineAugment
    ema: AveragedModel | None
    max_grad_norm: float | None = None


def _save_checkpoint(net: nn.Module, steps: TrainSteps, state: TrainState,
                     best: dict[str, Tensor], metrics: dict[str, float], rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {"model": cpu_state(net), "optimizer": steps.optimizer.state_dict(),
             "scheduler": steps.schedule.state_dict(),
             "ema": None if steps.ema is None else cpu_state(steps.ema),
             "state": asdict(state), "best_model": best},
            Path(tmp) / CHECKPOINT_FILE,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))



@dataclass(frozen=True, kw_only=True)
class DrnLoop(WorkerLoop):
    """What the DRN's Train workers get."""

    config: DrnConfig
    epochs: int
    image_size: tuple[int, int]
    label_column: str
    pos_weight: float  # negatives / positives of the training set
    train_rows: int
    init_state: dict[str, Tensor] | None  # pre-trained weights (fine-tuning), or None
    has_test: bool
    run_name: str


def _prepare_model(loop: DrnLoop, config: DrnConfig, device: torch.device,
                   world: int) -> nn.Module:
    """The DRN of this rank: initialised (from the fracture model when given), partly frozen,
    on its device, wrapped for DDP by Ray Train."""
    import ray.train.torch

    model = build_model(config, generator=torch.Generator().manual_seed(config.seed))
    if loop.init_state is not None:
        apply_init(model, loop.init_state)
        model.freeze(config.finetune_blocks)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives use the current device
        torch.backends.cudnn.benchmark = True
        if world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return ray.train.torch.prepare_model(model)


def _make_steps(net: nn.Module, config: DrnConfig, loop: DrnLoop,
                device: torch.device, batch_size: int, world: int) -> TrainSteps:
    optimizer = make_optimizer(net, config)
    rows = loop.train_rows // world
    return TrainSteps(
        optimizer=optimizer,
        schedule=make_scheduler(optimizer, config, steps_per_epoch=math.ceil(rows / batch_size),
                                epochs=loop.epochs),
        loss_fn=make_loss(loop.pos_weight, device),
        augment=AffineAugment(degrees=config.aug_degrees, scale=config.aug_scale,
                              translate=config.aug_translate, hflip=config.aug_hflip),
        ema=make_ema(net, config),
        max_grad_norm=config.max_grad_norm,
    )


def _restore(saved: Mapping[str, Any] | None, net: nn.Module, steps: TrainSteps,
             rank: int) -> tuple[TrainState, dict[str, Tensor] | None]:
    """Continue from Ray Train's latest checkpoint, if there is one."""
    if saved is None:
        return TrainState(), None
    net.load_state_dict(saved["model"])
    steps.optimizer.load_state_dict(saved["optimizer"])
    steps.schedule.load_state_dict(saved["scheduler"])
    if steps.ema is not None and saved.get("ema") is not None:
        steps.ema.load_state_dict(saved["ema"])
    known = TrainState.__dataclass_fields__  # a checkpoint written before the loss history
    state = TrainState(**{k: v for k, v in saved["state"].items() if k in known})
    log.info("rank %d resumed after epoch %d (best val AUC %.4f)", rank, state.epoch,
             state.best_auc)
    return state, saved["best_model"]


def _train_worker(train_loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train loop: DDP training with per-epoch validation, checkpoints and early stopping,
    then (all ranks) scoring of val/test with the best weights and (rank 0) publishing.
    Validation, checkpoint choice and the published weights are the EMA's when it is on."""
    import ray.train
    import ray.train.torch

    quiet_ray()  # this worker's Ray Data plans go to its log files, as the driver's do
    loop: DrnLoop = train_loop_config["loop"]
    config = loop.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    batch_size = max(1, config.batch_size // world)
    torch.set_num_threads(loop.torch_threads)
    torch.manual_seed(seed_for(config.seed, rank))

    model = _prepare_model(loop, config, device, world)
    net: DRN = getattr(model, "module", model)
    steps = _make_steps(net, config, loop, device, batch_size, world)
    state, best = _restore(load_checkpoint(), net, steps, rank)
    judged: nn.Module = net if steps.ema is None else steps.ema.module  # what validation scores
    best = best if best is not None else cpu_state(judged)
    train_shard, val_shard = (ray.train.get_dataset_shard(k) for k in ("train", "val"))
    client = _mlflow_client(loop) if rank == 0 else None
    split_kw = dict(label_column=loop.label_column, image_size=loop.image_size,
                    batch_size=batch_size, rank=rank, world_size=world)
    epoch = state.epoch + 1
    progress = (Progress(loop.epochs, f"[drn] {loop.run_name}", log, initial=epoch,
                         unit="epoch") if rank == 0 else None)
    while not state.stopped and epoch < loop.epochs:
        batches = epoch_batches(train_shard, batch_size=batch_size,
                                shuffle_rows=loop.train_rows // world + 1,
                                seed=seed_for(config.seed, rank, epoch, 2) % 2**31)
        train_loss = _train_epoch(
            model, batches, steps=steps, device=device, label_column=loop.label_column,
            generator=torch.Generator().manual_seed(seed_for(config.seed, rank, epoch, 1)),
            image_size=loop.image_size)
        _sync_buffers(model)
        _sync_buffers(judged)
        auc = float("nan")  # not validated this epoch (`val_every`)
        if validates(epoch, loop.epochs, config.val_every):
            _, labels, scores = _score_split(judged, val_shard, **split_kw)
            auc = _val_auc(labels, scores)
        steps.schedule.after_epoch(auc)
        if state.update(epoch, auc, latest=config.checkpoint == "last", loss=train_loss):
            best = cpu_state(judged)
        state.stopped = state.should_stop(config)
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_auc": auc,
                   "lr": steps.optimizer.param_groups[0]["lr"], "best_val_auc": state.best_auc}
        if client is not None and progress is not None:
            _log_epoch(client, loop, metrics, state, progress)
        _save_checkpoint(net, steps, state, best, metrics, rank)
        epoch += 1
    if progress is not None:
        progress.close()

    judged.load_state_dict(best)
    shards = {"val": val_shard} | ({"test": ray.train.get_dataset_shard("test")}
                                   if loop.has_test else {})
    rows = {name: _score_split(judged, shard, **split_kw) for name, shard in shards.items()}
    return _publish(loop, config, best, rows, state) if rank == 0 else None


def _log_epoch(client: Any, loop: DrnLoop, metrics: Mapping[str, float],
               state: TrainState, progress: Progress) -> None:
    validated = math.isfinite(metrics["val_auc"])  # not every epoch is (`val_every`)
    for key in ("train_loss", "val_auc", "lr"):
        if key != "val_auc" or validated:
            client.log_metric(loop.mlflow_run_id, key, float(metrics[key]),
                              step=int(metrics["epoch"]))
    # a bar on a terminal; else a logged line (Ray Train's patched print would double it)
    line = (f"[drn] {loop.run_name} epoch {int(metrics['epoch']) + 1}/{loop.epochs}: "
            f"train loss {metrics['train_loss']:.4f}")
    shown = {"loss": metrics["train_loss"]}
    if validated:
        line += (f", val AUC {metrics['val_auc']:.3f} (best {state.best_auc:.3f}, epoch "
                 f"{state.best_epoch + 1})")
        shown["auc"] = metrics["val_auc"]
    progress.step(line, **shown)


def _mlflow_client(loop: DrnLoop) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=loop.tracking_uri, registry_uri=loop.tracking_uri)


def _warn_if_failed(loop: DrnLoop, state: TrainState) -> None:
    if state.diverged:
        log.warning("[drn] %s diverged: train loss %.3f at epoch 1, %.3f at epoch %d (val AUC "
                    "%.3f); the published model is likely useless: lower drn.lr / drn.head_lr",
                    loop.run_name, state.train_losses[0], state.train_losses[-1], state.epoch + 1,
                    state.best_auc)
    elif state.unlearned:
        log.warning("[drn] %s did not learn: val AUC %.3f at epoch 1, %.3f for the kept model "
                    "(epoch %d); compare it with another training seed before trusting it",
                    loop.run_name, state.val_aucs[0], state.best_auc, state.best_epoch + 1)


def _publish(
    loop: DrnLoop,
    config: DrnConfig,
    best: dict[str, Tensor],
    rows: Mapping[str, tuple[list[str], np.ndarray, np.ndarray]],
    state: TrainState,
) -> dict[str, Any]:
    """Rank 0: best weights, predictions, the MLflow model (registered), then the manifest."""
    import mlflow
    import pyarrow as pa

    run_uri, endpoint = loop.run_uri, loop.s3_endpoint
    buffer = io.BytesIO()
    torch.save(best, buffer)
    best_uri = storage.join(run_uri, BEST_MODEL_FILE)
    storage.write_bytes(best_uri, buffer.getvalue(), endpoint_url=endpoint)

    table = pa.table({
        "image_id": pa.array([i for ids, _, _ in rows.values() for i in ids], pa.string()),
        "split": pa.array([s for s, (ids, _, _) in rows.items() for _ in ids], pa.string()),
        "label": pa.array(np.concatenate([y for _, y, _ in rows.values()]).astype(np.int8)),
        "score": pa.array(np.concatenate([p for _, _, p in rows.values()]).astype(np.float32)),
    })
    predictions_uri = storage.join(run_uri, PREDICTIONS_FILE)
    storage.write_parquet(predictions_uri, table, endpoint_url=endpoint)

    model = build_model(config)
    model.load_state_dict(best)
    height, width = loop.image_size
    tracking.configure(TrackingConfig(tracking_uri=loop.tracking_uri))
    active = mlflow.active_run()  # Train's local mode runs this in the driver, inside the run
    in_run = active is not None and active.info.run_id == loop.mlflow_run_id
    with contextlib.nullcontext() if in_run else mlflow.start_run(run_id=loop.mlflow_run_id):
        version = tracking.log_torch_model(
            model.eval(), name="model", input_example=np.zeros((1, 1, height, width), np.float32),
            registered_name=loop.registered_name, alias=loop.alias,
        )
        mlflow.set_tags({"predictions_uri": predictions_uri, "best_weights_uri": best_uri,
                         "diverged": str(state.diverged).lower(),
                         "unlearned": str(state.unlearned).lower()})
        mlflow.log_metrics({"best_val_auc": state.best_auc, "best_epoch": state.best_epoch})
    _warn_if_failed(loop, state)
    registered = loop.registered_name
    content = {
        "diverged": state.diverged,
        "unlearned": state.unlearned,
        "best_val_auc": state.best_auc,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch + 1,
        "model_version": version,
        "model_uri": (f"models:/{registered}/{version}" if registered
                      else f"runs:/{loop.mlflow_run_id}/model"),
        "predictions_uri": predictions_uri,
        "best_weights_uri": best_uri,
        "mlflow_run_id": loop.mlflow_run_id,
        "run_uri": run_uri,
        "train_losses": state.train_losses,
        "val_aucs": state.val_aucs,
    }
    storage.publish_manifest(run_uri, content, endpoint_url=endpoint)
    return content


# ---- driver-side API ---------------------------------------------------------------------------
def _class_counts(ds: ray.data.Dataset, label_column: str, name: str) -> tuple[int, int]:
    if label_column not in ds.columns():
        raise DataError(f"{name} dataset has no {label_column!r} column (columns: {ds.columns()})")
    # one streaming pass over one column (Ray Data aggregations cost a shuffle each)
    batches = ds.select_columns([label_column], num_cpus=FEED_CPUS).iter_batches(
        batch_size=None, batch_format="numpy")
    labels = [np.asarray(b[label_column]) for b in batches]
    y = np.concatenate(labels) if labels else np.zeros(0)
    return int(y.size), int(np.count_nonzero(y))


def _select(ds: ray.data.Dataset, label_column: str) -> ray.data.Dataset:
    missing = [c for c in (*_ROW_COLUMNS, label_column) if c not in ds.columns()]
    if missing:
        raise DataError(
            f"classification rows lack columns {missing}; see CONTRACTS.md (image shards)"
        )
    return ds.select_columns([*_ROW_COLUMNS, label_column], num_cpus=FEED_CPUS)


@dataclass(frozen=True)
class ClassifierData:
    """What a DRN trains on: Ray Datasets of image-shard rows (the test split is scored and
    published with the model when given), labelled by `label_column`."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset | None = None
    label_column: str = "label"

    def selected(self) -> dict[str, ray.data.Dataset]:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {k: _select(ds, self.label_column) for k, ds in splits.items() if ds is not None}


def fit_classifier(
    config: DrnConfig,
    data: ClassifierData,
    *,
    publish: Publish,
    workers: Workers,
    image_size: tuple[int, int],
    init_from: str | None = None,
    epochs: int | None = None,
) -> ClassifierResult:
    """Train a DRN with Ray Train (DDP over ``workers.num_workers``) and publish it under
    ``publish.run_uri``.

    `init_from` (a model URI, best_model.pt, checkpoint or run URI) starts from pre-trained
    weights and fine-tunes the last ``config.finetune_blocks`` stages and the head. A run URI
    that already holds a manifest is returned as is unless ``publish.overwrite``; one that holds
    Ray checkpoints of an unfinished run resumes from the latest of them.
    """
    if (done := finished_run(publish.run_uri, publish.overwrite)) is not None:
        return ClassifierResult.from_manifest(done)
    if len(image_size) != 2 or min(image_size) < 8:
        raise ValueError(f"image_size must be (height, width) >= 8 px, got {image_size}")
    datasets = data.selected()
    counts = {name: _class_counts(ds, data.label_column, name) for name, ds in datasets.items()}
    for name in ("train", "val"):
        n, pos = counts[name]
        if pos == 0 or pos == n:
            raise DataError(
                f"{name} set has {pos} positives among {n} rows ({data.label_column!r}): "
                "training and validation AUC need both classes"
            )
    n_train, pos_train = counts["train"]
    uri = tracking.tracking_uri(publish.tracking)
    epochs, pos_weight = epochs or config.epochs, (n_train - pos_train) / pos_train
    params = {
        "drn": config.model_dump(),
        "data": {f"{name}_{k}": v for name, (n, pos) in counts.items()
                 for k, v in (("n", n), ("pos", pos))},
        "epochs": epochs, "pos_weight": round(pos_weight, 4),
        "label_column": data.label_column, "image_size": list(image_size),
        "init_from": init_from or "", "num_workers": workers.num_workers,
        "use_gpu": workers.use_gpu, "run_uri": publish.run_uri,
    }
    run_name = publish.name("drn", publish.run_uri)
    with tracking.start_run(publish.experiment, run_name, params,
                            tracking=TrackingConfig(tracking_uri=uri),
                            run_id=publish.mlflow_run_id) as run:
        loop = DrnLoop(
            config=config, epochs=epochs, image_size=(int(image_size[0]), int(image_size[1])),
            label_column=data.label_column, pos_weight=pos_weight, train_rows=n_train,
            init_state=(load_init_state(init_from, tracking_config=publish.tracking)
                        if init_from else None),
            has_test=data.test is not None, run_name=run_name, run_uri=publish.run_uri,
            s3_endpoint=storage.s3_endpoint() if storage.is_s3(publish.run_uri) else None,
            tracking_uri=uri, mlflow_run_id=run.info.run_id,
            registered_name=publish.registered_name, alias=publish.alias)
        done = run_ray_train(_train_worker, loop, workers=workers,
                             storage_uri=storage.join(publish.run_uri, "ray"),
                             datasets=datasets, split=["train"])
    return ClassifierResult.from_manifest(done)


def step_matched(config: DrnConfig, *, rows: int, baseline_rows: int) -> DrnConfig:
    """What a DRN trained on `rows` training rows trains with: `config`, or under
    ``augmented_epochs="baseline_steps"`` its epochs scaled by baseline_rows / rows (at least 1),
    so it takes as many optimiser steps as the baseline on its `baseline_rows`: an augmented
    arm (more rows) trains fewer epochs, a learning-curve point with a share of the positives
    (fewer rows) more."""
    if config.augmented_epochs == "same" or rows == baseline_rows:
        return config
    if rows <= 0 or baseline_rows <= 0:
        raise ValueError(f"rows must be > 0, got {rows} (baseline {baseline_rows})")
    epochs = max(1, round(config.epochs * baseline_rows / rows))
    return config.model_copy(update={"epochs": epochs})


def pretraining_config(config: DrnConfig) -> DrnConfig:
    """What the fracture pre-training trains with: every stage from scratch at ``pretrain_lr``
    under the paper's plateau schedule, whatever the fine-tuning regime (head lr, warm-up,
    cosine, EMA) is; the training seed is the config's."""
    return config.model_copy(update={"lr": config.pretrain_lr, "head_lr": None,
                                     "schedule": "plateau", "warmup_epochs": 0.0,
                                     "ema_decay": None, "val_every": 1})


def pretrain_fracture(
    config: DrnConfig,
    images: ray.data.Dataset,
    *,
    publish: Publish,
    workers: Workers,
    image_size: tuple[int, int],
) -> ClassifierResult:
    """Auxiliary pre-training (paper 4.2): the same DRN on the fracture corpus.

    `images` are image-shard rows; those with task == "fracture" are used, label = ``fracture``,
    split by their ``split`` column, for ``config.pretrain_epochs`` epochs from scratch at
    ``config.pretrain_lr``.
    """
    from ray.data.expressions import col

    split = {s: images.filter(expr=(col("task") == "fracture") & (col("split") == s),
                              num_cpus=FEED_CPUS)  # runs inside the feed: see FEED_CPUS
             for s in ("train", "val", "test")}
    return fit_classifier(
        pretraining_config(config),
        ClassifierData(split["train"], split["val"], split["test"], label_column="fracture"),
        publish=publish, workers=workers, image_size=image_size, epochs=config.pretrain_epochs,
    )


__all__ = [
    "AffineAugment",
    "ClassifierData",
    "ClassifierResult",
    "FRACTURE_MODEL",
    "TrainState",
    "apply_init",
    "batch_to_arrays",
    "build_model",
    "fit_classifier",
    "load_best_model",
    "load_init_state",
    "make_loss",
    "make_optimizer",
    "make_scheduler",
    "predict",
    "pretrain_fracture",
    "pretraining_config",
    "train_step",
]
