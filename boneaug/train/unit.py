"""UNIT training (paper 3.1, Liu et al. 2017): losses, one D + G iteration, the Ray Train loop.

Losses (SPEC 3, eq. 1-4; both domains, h = healthy, l = lesion; reference loss names in brackets)::

    L_G = lambda_gan    * (LS_G(D_h(x_lh)) + LS_G(D_l(x_hl)))          [gan_w * loss_gen_adv]
        + lambda_kl     * (KL(mu_h) + KL(mu_l))                          [recon_kl_w]
        + lambda_recon  * (|x_hh - x_h|_1 + |x_ll - x_l|_1)              [recon_x_w]
        + lambda_kl_cyc * (KL(mu_hl) + KL(mu_lh))                        [recon_kl_cyc_w]
        + lambda_cyc    * (|x_hlh - x_h|_1 + |x_lhl - x_l|_1)            [recon_x_cyc_w]
        + lambda_change * (|x_hl - x_h|_1 + |x_lh - x_l|_1)              [not in the paper: 0]
    L_D = lambda_gan * (LS_D(D_h; x_h, x_lh) + LS_D(D_l; x_l, x_hl))

with KL(mu) = mean(mu^2) (reduced VAE, unit variance), LS_G(o) = sum over scales of
mean((o - 1)^2), LS_D = sum over scales of mean(o_fake^2) + mean((o_real - 1)^2), L1 as a mean.
A weight of 0 removes its term *and the computation only it needs* (no decoder pass for x_hh when
lambda_recon = 0, no re-encoding when both cycle weights are 0, no discriminator at all when
lambda_gan = 0); the reference crashed on 0 weights.

One iteration, without recomputation (`train_iteration`):

1. G forward once, with gradients: encode x_h and x_l, decode the reconstructions and the
   translations x_hl = G_l(E_h(x_h) + n), x_lh = G_h(E_l(x_l) + n), re-encode, decode the cycles.
2. D step on the *detached* translations of step 1 and the real batches, then D's optimiser step.
3. G step: the adversarial term against the *updated* D (D's parameters frozen, so the backward
   computes input gradients only), plus the other terms from step 1's graph; G's optimiser step.

This is the reference's order (D step, then G step against the freshly updated D), minus its
second generator forward: the reference's D step decodes translations from the same G with a
fresh noise draw, then its G step encodes and decodes everything again. Reusing the G-step
translations for D changes only which noise sample D sees (one draw from the same distribution,
shared by both steps), not any expectation; the translations D sees come from the same,
not-yet-updated G in both schemes. Evaluating the adversarial term against the updated D keeps
the reference's game dynamics exactly (the alternative, the pre-update D, would need D's forward
before its own update and would lag D by one step). The price is keeping step 1's graph alive
during the D step (D's activations are small next to G's).

Distributed data parallel: `UNIT` and `Discriminators` are wrapped separately; every gradient
comes from a call to a wrapper's forward (one per iteration each), except the G-step pass
through D, which calls the *unwrapped* D with its parameters frozen: it needs no gradient sync and
must not arm D's reducer a second time. Neither network has buffers (InstanceNorm without running
statistics, GroupNorm), so there is nothing to broadcast per forward
(``forward_sync_buffers=False``, torch 2.14's name for ``broadcast_buffers``).
`find_unused_parameters` is needed only when the weights leave the decoders unused (only
lambda_kl > 0).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boneaug.data.datasets import FEED_CPUS
from boneaug.errors import DataError
from boneaug.models.diffaugment import DiffAugment
from boneaug.models.precision import autocast
from boneaug.models.unit import UNIT, Discriminators, ForwardPlan, UnitArch, UnitOutputs
from boneaug.progress import quiet_ray
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

    from boneaug.config import UnitConfig
    from boneaug.eval.quality import CriticConfig, QualitySets

log = logging.getLogger(__name__)

FINAL_FILE = "final.pt"
LR_GAMMA = 0.5  # StepLR factor of the reference


# ---- losses ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossWeights:
    """lambda0..lambda4 of the paper (see the module docstring)."""

    gan: float = 10.0
    kl: float = 0.1
    recon: float = 100.0
    kl_cyc: float = 0.1
    cyc: float = 100.0
    change: float = 0.0  # the minimal-change prior (UnitConfig.lambda_change; not the paper's)

    def __post_init__(self) -> None:
        values = asdict(self)
        if any(not math.isfinite(v) or v < 0 for v in values.values()):
            raise ValueError(f"loss weights must be finite and >= 0, got {values}")
        if not any(values.values()):
            raise ValueError("all UNIT loss weights are 0: nothing to train")

    @classmethod
    def from_config(cls, config: UnitConfig) -> LossWeights:
        return cls(gan=config.lambda_gan, kl=config.lambda_kl, recon=config.lambda_recon,
                   kl_cyc=config.lambda_kl_cyc, cyc=config.lambda_cyc,
                   change=config.lambda_change)

    def plan(self) -> ForwardPlan:
        """The outputs the non-zero weights need."""
        cycle_encode = self.kl_cyc > 0 or self.cyc > 0
        return ForwardPlan(recon=self.recon > 0,
                           cross=self.gan > 0 or self.change > 0 or cycle_encode,
                           cycle_encode=cycle_encode, cycle_decode=self.cyc > 0)

    @property
    def leaves_unused_parameters(self) -> bool:
        """True when some generator parameters get no gradient (DDP must be told)."""
        return not self.plan().uses_decoders


def kl_loss(mu: Tensor) -> Tensor:
    """Reduced-VAE KL of a unit-variance Gaussian: mean(mu^2), in float32."""
    return mu.float().pow(2).mean()


def l1_loss(x: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(x.float(), target.float())


def lsgan_g_loss(fake_outs: list[Tensor]) -> Tensor:
    """Generator LSGAN loss: sum over scales of mean((D(fake) - 1)^2)."""
    return sum((o.float() - 1).pow(2).mean() for o in fake_outs)  # type: ignore[return-value]


def lsgan_d_loss(real_outs: list[Tensor], fake_outs: list[Tensor]) -> Tensor:
    """Discriminator LSGAN loss: sum over scales of mean(D(fake)^2) + mean((D(real) - 1)^2)."""
    return sum(f.float().pow(2).mean() + (r.float() - 1).pow(2).mean()  # type: ignore[return-value]
               for r, f in zip(real_outs, fake_outs, strict=True))


# ---- one iteration -------------------------------------------------------------------------------
Augment = Callable[[Tensor], Tensor]  # what D's inputs pass through (DiffAugment), both steps


def _identity(x: Tensor) -> Tensor:
    return x


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped module with requires_grad off for its parameters (restored afterwards).

    Forward passes inside produce gradients for their inputs only, and none of DDP's hooks or
    reducer state is touched (the call bypasses the wrapper)."""
    net = unwrap(module)
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield net
    finally:
        for p in params:
            p.requires_grad_(True)


def generate(
    unit: nn.Module,
    x_h: Tensor,  # (B, C, H, W) in [-1, 1]
    x_l: Tensor,  # (B, C, H, W) in [-1, 1]
    *,
    weights: LossWeights,
    generator: torch.Generator | None = None,
) -> UnitOutputs:
    """Step 1: the generator forward (with gradients) through the (possibly DDP-wrapped) UNIT."""
    with autocast(x_h.device):
        return unit(x_h, x_l, plan=weights.plan(), noise=True, generator=generator)


def d_step(
    dis: nn.Module,
    out: UnitOutputs,
    x_h: Tensor,
    x_l: Tensor,
    *,
    weights: LossWeights,
    optimizer: torch.optim.Optimizer,
    augment: Augment | None = None,
) -> dict[str, Tensor]:
    """Step 2: update D_h, D_l on real batches and the detached translations; detached losses.

    One forward of the (wrapped) `Discriminators` scores [x_lh; x_h] with D_h and [x_hl; x_l]
    with D_l, each batch through `augment` first (DiffAugment). Returns {} and does nothing when
    lambda_gan is 0.
    """
    if weights.gan == 0:
        return {}
    assert out.x_hl is not None and out.x_lh is not None  # the plan computes them when gan > 0
    optimizer.zero_grad(set_to_none=True)
    n_h, n_l = len(out.x_lh), len(out.x_hl)
    aug = augment or _identity
    with autocast(x_h.device):
        outs_h, outs_l = dis(aug(torch.cat([out.x_lh.detach().to(x_h.dtype), x_h])),
                             aug(torch.cat([out.x_hl.detach().to(x_l.dtype), x_l])))
    loss_h = lsgan_d_loss([o[n_h:] for o in outs_h], [o[:n_h] for o in outs_h])
    loss_l = lsgan_d_loss([o[n_l:] for o in outs_l], [o[:n_l] for o in outs_l])
    total = weights.gan * (loss_h + loss_l)
    total.backward()
    optimizer.step()
    return {"d_h": loss_h.detach(), "d_l": loss_l.detach(), "d_total": total.detach()}


def g_step(
    dis: nn.Module,
    out: UnitOutputs,
    x_h: Tensor,
    x_l: Tensor,
    *,
    weights: LossWeights,
    optimizer: torch.optim.Optimizer,
    augment: Augment | None = None,
) -> dict[str, Tensor]:
    """Step 3: the generator loss on step 1's graph (adversarial term against the current,
    frozen D, which sees the translations through `augment`), backward, G's optimiser step;
    returns the detached terms and their total."""
    w = weights
    terms: dict[str, tuple[float, Tensor]] = {}
    if w.gan > 0:
        aug = augment or _identity
        with frozen(dis) as net, autocast(x_h.device):
            outs_h, outs_l = net(aug(out.x_lh), aug(out.x_hl))
        terms["gan_h"] = (w.gan, lsgan_g_loss(outs_h))
        terms["gan_l"] = (w.gan, lsgan_g_loss(outs_l))
    if w.kl > 0:
        terms["kl_h"], terms["kl_l"] = (w.kl, kl_loss(out.mu_h)), (w.kl, kl_loss(out.mu_l))
    if w.recon > 0:
        terms["recon_h"] = (w.recon, l1_loss(out.x_hh, x_h))  # type: ignore[arg-type]
        terms["recon_l"] = (w.recon, l1_loss(out.x_ll, x_l))  # type: ignore[arg-type]
    if w.kl_cyc > 0:
        terms["kl_cyc_h"] = (w.kl_cyc, kl_loss(out.mu_hl))  # type: ignore[arg-type]
        terms["kl_cyc_l"] = (w.kl_cyc, kl_loss(out.mu_lh))  # type: ignore[arg-type]
    if w.cyc > 0:
        terms["cyc_h"] = (w.cyc, l1_loss(out.x_hlh, x_h))  # type: ignore[arg-type]
        terms["cyc_l"] = (w.cyc, l1_loss(out.x_lhl, x_l))  # type: ignore[arg-type]
    if w.change > 0:
        terms["change_h"] = (w.change, l1_loss(out.x_hl, x_h))  # type: ignore[arg-type]
        terms["change_l"] = (w.change, l1_loss(out.x_lh, x_l))  # type: ignore[arg-type]
    total = sum(weight * value for weight, value in terms.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # type: ignore[union-attr]
    optimizer.step()
    detached = {k: v.detach() for k, (_, v) in terms.items()}
    return detached | {"g_total": total.detach()}  # type: ignore[union-attr]


@dataclass
class Optimizers:
    """Adam for G (E_h, E_l, G_h, G_l; shared blocks once) and for D, each with StepLR."""

    g: torch.optim.Adam
    d: torch.optim.Adam
    g_sched: torch.optim.lr_scheduler.StepLR
    d_sched: torch.optim.lr_scheduler.StepLR

    def state_dict(self) -> dict[str, Any]:
        return {"g": self.g.state_dict(), "d": self.d.state_dict(),
                "g_sched": self.g_sched.state_dict(), "d_sched": self.d_sched.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])
        self.g_sched.load_state_dict(state["g_sched"])
        self.d_sched.load_state_dict(state["d_sched"])


def make_optimizers(unit: nn.Module, dis: nn.Module, config: UnitConfig) -> Optimizers:
    """Adam(lr, betas, weight_decay) and StepLR(lr_step, 0.5) per network, as the reference
    (D at `disc_lr` where set).

    Adam is torch's fused implementation (same update, L2 weight decay as the reference; one
    kernel over all parameters: 7x faster than the per-parameter loop on this CPU for the paper
    networks, where it was ~15 % of a batch-1 iteration). Build after moving the networks to
    their device.
    """
    def adam(module: nn.Module, lr: float) -> torch.optim.Adam:
        params = list(unwrap(module).parameters())
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=lr, betas=(config.beta1, config.beta2),
                                weight_decay=config.weight_decay, fused=fused or None)

    g, d = adam(unit, config.lr), adam(dis, config.disc_lr or config.lr)
    return Optimizers(g, d, torch.optim.lr_scheduler.StepLR(g, config.lr_step, LR_GAMMA),
                      torch.optim.lr_scheduler.StepLR(d, config.lr_step, LR_GAMMA))


# what an extra D step needs from G: the translations only
TRANSLATIONS = ForwardPlan(recon=False, cross=True, cycle_encode=False, cycle_decode=False)


def train_iteration(
    unit: nn.Module,
    dis: nn.Module,
    x_h: Tensor,  # (B, C, H, W) healthy, in [-1, 1], on the networks' device
    x_l: Tensor,  # (B, C, H, W) lesion, in [-1, 1]
    *,
    weights: LossWeights,
    optimizers: Optimizers,
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
    extra_d: Sequence[tuple[Tensor, Tensor]] = (),
) -> dict[str, Tensor]:
    """One UNIT iteration (G forward once, D step, G step, schedulers); detached losses.
    `augment` (DiffAugment) transforms every batch D sees, in both steps. `extra_d`: more
    (healthy, lesion) batch pairs, one D step each before the iteration's own (unit.disc_steps),
    on translations made without gradients."""
    unit.train()
    dis.train()
    if weights.gan > 0:
        for y_h, y_l in extra_d:
            with torch.no_grad(), autocast(y_h.device):
                fakes = unit(y_h, y_l, plan=TRANSLATIONS, noise=True, generator=generator)
            d_step(dis, fakes, y_h, y_l, weights=weights, optimizer=optimizers.d, augment=augment)
    out = generate(unit, x_h, x_l, weights=weights, generator=generator)
    losses = d_step(dis, out, x_h, x_l, weights=weights, optimizer=optimizers.d, augment=augment)
    losses |= g_step(dis, out, x_h, x_l, weights=weights, optimizer=optimizers.g, augment=augment)
    optimizers.g_sched.step()
    if weights.gan > 0:  # D is not trained without the adversarial term
        optimizers.d_sched.step()
    return losses


# ---- data --------------------------------------------------------------------------------------
PATCH_COLUMNS = ("height", "width", "pixels")


def decode_patch_batch(batch: Mapping[str, Any], size: int) -> Tensor:
    """A numpy batch of patch rows (CONTRACTS.md patch sets) -> (B, 1, S, S) float32 in [-1, 1]."""
    from boneaug.data.arrays import decode_pixels

    hs, ws = np.asarray(batch["height"]), np.asarray(batch["width"])
    if np.any(hs != size) or np.any(ws != size):
        bad = int(np.flatnonzero((hs != size) | (ws != size))[0])
        raise DataError(
            f"a patch is {hs[bad]}x{ws[bad]}, UNIT trains on {size}x{size}: all patch sets of "
            "one training must come from the same patch-making run (patches.size)"
        )
    pixels = np.stack([decode_pixels(bytes(p), size, size) for p in batch["pixels"]])
    return torch.from_numpy(pixels[:, None]).mul_(2).sub_(1)


def _collate(size: int) -> Any:
    """A Ray Data NumpyBatchCollateFn that decodes patch rows (Ray imported lazily)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class DecodePatches(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> Tensor:
            return decode_patch_batch(batch, size)

    return DecodePatches()


class PatchStream:
    """Random batches (B, 1, S, S) in [-1, 1] from one worker's shard, forever.

    The first epoch streams the shard with `iter_torch_batches` (local shuffle) and keeps the
    decoded rows; later epochs reshuffle those in memory (a seeded permutation per epoch), so a
    long training does not re-run the Ray Data pipeline and its split barrier hundreds of times.
    Translation patch sets are small by construction (hundreds of patches: ~35 MB per worker for
    the paper's 536 patches of 256^2 on 4 workers). A shard larger than `cache_bytes` is streamed
    again every epoch instead. Every worker holds the same number of rows (equal split), so all
    workers start epochs at the same iteration.
    """

    def __init__(self, shard: Any, *, batch_size: int, size: int, seed: int,
                 device: torch.device, cache_bytes: int = 2 << 30, name: str = "patches") -> None:
        self.shard, self.batch_size, self.size, self.seed = shard, batch_size, size, seed
        self.device, self.cache_bytes, self.name = device, cache_bytes, name
        self._iter = self._batches()

    def __iter__(self) -> PatchStream:
        return self

    def __next__(self) -> Tensor:
        return next(self._iter)

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def _batches(self) -> Iterator[Tensor]:
        rows: list[Tensor] | None = []
        cached = 0
        yielded = 0
        for batch in self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=False, device="cpu",
            local_shuffle_buffer_size=max(256, 4 * self.batch_size),
            local_shuffle_seed=self.seed % 2**31, collate_fn=_collate(self.size),
        ):
            if rows is not None:
                cached += batch.numel() * batch.element_size()
                if cached <= self.cache_bytes:
                    rows.append(batch)
                else:
                    rows = None
            if len(batch) == self.batch_size:
                yielded += 1
                yield self._to_device(batch)
        if yielded == 0:
            raise DataError(
                f"the {self.name} shard of this worker has fewer rows than its batch size "
                f"{self.batch_size}: use fewer workers, a smaller batch_size or more patches"
            )
        epoch = 1
        while True:
            if rows is None:
                for batch in self.shard.iter_torch_batches(
                    batch_size=self.batch_size, drop_last=True, device="cpu",
                    local_shuffle_buffer_size=max(256, 4 * self.batch_size),
                    local_shuffle_seed=(self.seed + epoch) % 2**31, collate_fn=_collate(self.size),
                ):
                    yield self._to_device(batch)
            else:
                data = torch.cat(rows) if len(rows) > 1 else rows[0]
                rows = [data]
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(
                    seed_for(self.seed, epoch)))
                for start in range(0, len(data) - self.batch_size + 1, self.batch_size):
                    yield self._to_device(data[order[start : start + self.batch_size]])
            epoch += 1



# ---- metrics, checkpoints, samples ---------------------------------------------------------------
class LossMeter:
    """Sums of detached loss tensors on the device; `reduce` averages over iterations and ranks
    (a collective: every rank calls it at the same iteration)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, losses: Mapping[str, Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value.float() if key in self.sums else value.float()
        self.count += 1

    def reduce(self) -> dict[str, float]:
        import torch.distributed as dist

        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.cpu().tolist(), strict=True))


def checksum(*modules: nn.Module) -> int:
    """48 bits of the SHA-256 of all parameter bytes: equal iff the weights are (almost surely)
    bitwise equal; a desynchronisation detector for DDP ranks."""
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for p in unwrap(module).parameters():
            digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int(digest.hexdigest()[:12], 16)



def training_state(unit: nn.Module, dis: nn.Module, optimizers: Optimizers | None,
                   arch: UnitArch, config: UnitConfig, iteration: int) -> dict[str, Any]:
    """What a checkpoint (`optimizers` given) or the final weights file holds."""
    state: dict[str, Any] = {"arch": asdict(arch), "config": config.model_dump(mode="json"),
                             "iteration": iteration, "unit": cpu_state(unit)}
    if optimizers is not None:
        state |= {"dis": cpu_state(dis), "optimizers": optimizers.state_dict()}
    return state


GRID_ROWS = ("healthy", "h -> h", "h -> l", "added x4", "lesion", "l -> h")
GRID_LABEL_WIDTH = 64


def sample_grid(
    x_h: Tensor, x_hh: Tensor, x_hl: Tensor, x_l: Tensor, x_lh: Tensor, *, pad: int = 2,
    gain: float = 4.0, labels: bool = True,
) -> np.ndarray:
    """A labelled (H, W) uint8 grid; each input (B, 1, S, S) in [0, 1], one row each (GRID_ROWS):

    healthy x_h, its reconstruction x_h->h, its translation x_h->l, what the translation adds
    (x_h->l - x_h->h, times `gain`, mid-grey = nothing, dark = more lucent), lesion x_l and its
    translation x_l->h. The "added" row compares the translation with the same encoder's
    reconstruction, so the blur both share cancels and only the lesion G_l draws remains.
    With `labels`, a GRID_LABEL_WIDTH-pixel column on the left names the rows.
    """
    added = (x_hl.float() - x_hh.float()) * gain + 0.5
    rows = []
    for x in (x_h, x_hh, x_hl, added, x_l, x_lh):
        tiles = x.detach().float().clamp(0, 1).cpu().numpy()[:, 0]  # (B, S, S)
        padded = np.pad(tiles, ((0, 0), (pad, pad), (pad, pad)), constant_values=1.0)
        rows.append(np.concatenate(list(padded), axis=1))
    # the healthy and lesion batches may hold different counts: pad the shorter rows with white
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=1.0) for r in rows]
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    return _label_rows(grid) if labels else grid


def _label_rows(grid: np.ndarray) -> np.ndarray:
    """`grid` with a white column on the left naming its GRID_ROWS (equal-height rows)."""
    from PIL import Image, ImageDraw

    column = Image.new("L", (GRID_LABEL_WIDTH, grid.shape[0]), 255)
    draw = ImageDraw.Draw(column)
    row_height = grid.shape[0] // len(GRID_ROWS)
    for i, name in enumerate(GRID_ROWS):
        draw.text((3, i * row_height + row_height // 2 - 5), name, fill=0)
    return np.concatenate([np.asarray(column), grid], axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- Ray Train: the per-worker loop --------------------------------------------------------------

def _report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """ray.train.report on every rank (a barrier in Train V2); rank 0 attaches the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# what rank 0 logs to the console every sample_every iterations (all of it goes to MLflow)
PROGRESS_KEYS = ("loss/d_total", "loss/g_total", "loss/recon_h", "loss/cyc_h", "d/auc_l",
                 "quality/frac_translated", "quality/frac_source")


@torch.no_grad()
def discriminator_aucs(unit: UNIT, dis: Discriminators, *, lesion: np.ndarray,
                       normal: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """How well each D tells real from translated, as ROC AUC of its mean score (all scales):
    D_l on real lesion patches against translations of `source` patches (which G never trains
    on), D_h on real normal patches against translations of the lesion patches. 0.5 is a D at
    the constant point, where only the reconstruction and cycle terms shape G. No augmentation."""
    from boneaug.augment.translate import translate_patches
    from boneaug.eval.metrics import roc_auc

    device = next(dis.parameters()).device
    was_training = dis.training
    dis.eval()

    def scores(net: nn.Module, patches: np.ndarray) -> np.ndarray:  # [0, 1] patches
        x = torch.tensor(patches, dtype=torch.float32, device=device) * 2 - 1
        with autocast(device):
            outs = net(x)
        return torch.stack([o.float().mean((1, 2, 3)) for o in outs]).mean(0).cpu().numpy()

    def auc(net: nn.Module, real: np.ndarray, fake: np.ndarray) -> float:
        labels = np.r_[np.ones(len(real)), np.zeros(len(fake))]
        return roc_auc(labels, np.r_[scores(net, real), scores(net, fake)])

    h2l = translate_patches(unit.translator("h2l"), source, batch_size=64)
    l2h = translate_patches(unit.translator("l2h"), lesion, batch_size=64)
    result = {"d/auc_l": auc(dis.dis_l, lesion, h2l), "d/auc_h": auc(dis.dis_h, normal, l2h)}
    dis.train(was_training)
    return result


@dataclass(frozen=True, kw_only=True)
class UnitLoop(WorkerLoop):
    """What UNIT's Train workers get."""

    config: UnitConfig
    patch_size: int
    critic: dict[str, Any] | None  # the quality probe's critic (spec, state, settings), or None
    unit_uri: str
    # a lesion critic whose verdict on the translations is logged and nothing else (the phantom
    # critic, an instrument: architecture spec, state, threshold), or None
    instrument: dict[str, Any] | None = None


class _Rank0:
    """Rank 0's side jobs: MLflow metrics, sample grids, the quality probe."""

    def __init__(self, loop: UnitLoop) -> None:
        from mlflow import MlflowClient

        self.run_id: str = loop.mlflow_run_id
        uri = loop.tracking_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.probe = None
        self.sets: dict[str, np.ndarray] = {}
        if loop.critic is not None:
            from boneaug.eval.quality import QualityProbe

            spec = loop.critic
            self.probe = QualityProbe(_rebuilt(spec), spec["source"], threshold=spec["threshold"],
                                      lesion=spec["lesion"], normal=spec["normal"])
            self.sets = {"lesion": spec["lesion"], "normal": spec["normal"]}
        self.instrument = None if loop.instrument is None else (
            _rebuilt(loop.instrument), float(loop.instrument["threshold"]))
        self.samples: tuple[Tensor, Tensor] | None = None

    def instrument_rates(self, translated: np.ndarray) -> dict[str, float]:
        """The instrument's lesion-call rates: translated sources, the same sources untranslated,
        real lesion patches."""
        from boneaug.eval.quality import lesion_probability

        critic, cut = self.instrument  # type: ignore[misc]
        assert self.probe is not None
        sets = {"translated": translated, "source": self.probe.source,
                "real_lesion": self.sets["lesion"]}
        return {f"instrument/{k}": float((lesion_probability(critic, v) >= cut).mean())
                for k, v in sets.items()}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def keep_samples(self, x_h: Tensor, x_l: Tensor, count: int = 8) -> None:
        """Collect the grid's `count` healthy and lesion patches from the first batches (a
        worker's batch is batch_size / workers rows, fewer than `count` with 2+ workers)."""
        if self.samples is not None and len(self.samples[0]) >= count:
            return
        kept_h, kept_l = self.samples or (x_h[:0], x_l[:0])
        self.samples = (torch.cat([kept_h, x_h.detach()])[:count].clone(),
                        torch.cat([kept_l, x_l.detach()])[:count].clone())

    @torch.no_grad()
    def sample_and_probe(self, unit: nn.Module, dis: nn.Module, step: int) -> dict[str, float]:
        """Log a sample grid PNG and (with a probe) the quality signal and the discriminators'
        real-vs-translated AUCs; returns the metrics."""
        from boneaug.augment.translate import translate_patches

        net: UNIT = unwrap(unit)  # type: ignore[assignment]
        metrics: dict[str, float] = {}
        if self.samples is not None:
            x_h, x_l = ((x + 1) / 2 for x in self.samples)
            h2h, h2l, l2h = (net.translator(d) for d in ("h2h", "h2l", "l2h"))
            with autocast(x_h.device):
                grid = sample_grid(x_h, h2h(x_h), h2l(x_h), x_l, l2h(x_l))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"iter_{step:07d}.png"
                path.write_bytes(png_bytes(grid))
                self.client.log_artifact(self.run_id, str(path), artifact_path="samples")
        if self.probe is not None:
            translator = net.translator("h2l")
            signal = self.probe(lambda p: translate_patches(translator, p, batch_size=64))
            metrics = signal.as_metrics() | discriminator_aucs(
                net, unwrap(dis), lesion=self.sets["lesion"], normal=self.sets["normal"],
                source=self.probe.source)
            if self.instrument is not None:
                metrics |= self.instrument_rates(translate_patches(translator, self.probe.source))
        net.train()
        return metrics


def _rebuilt(spec: Mapping[str, Any]) -> nn.Module:
    """A critic (the quality probe's, or the instrument: e.g. the phantom critic's ensemble) from
    its architecture spec and state, in eval mode."""
    from boneaug.models.specs import build_from_spec

    model = build_from_spec(spec["arch"])
    model.load_state_dict(spec["state"])
    return model.eval()


def _networks(config: UnitConfig, weights: LossWeights, arch: UnitArch, rank: int,
              device: torch.device) -> tuple[nn.Module, nn.Module, Optimizers, int]:
    """UNIT and its discriminators (DDP-wrapped), their optimisers, and the iteration they stand
    at: from this run's last checkpoint when there is one, else freshly initialised."""
    import ray.train.torch

    init = torch.Generator().manual_seed(config.seed)  # same on every rank; DDP broadcasts anyway
    unit, dis = UNIT(arch, generator=init), Discriminators(arch, generator=init)
    saved = load_checkpoint()
    if saved is not None:
        unit.load_state_dict(saved["unit"])
        dis.load_state_dict(saved["dis"])
        log.info("rank %d resumes UNIT training after iteration %d", rank, saved["iteration"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        unit = unit.to(memory_format=torch.channels_last)
        dis = dis.to(memory_format=torch.channels_last)
    unit_w = ray.train.torch.prepare_model(unit, parallel_strategy_kwargs={
        "find_unused_parameters": weights.leaves_unused_parameters, "forward_sync_buffers": False})
    dis_w = ray.train.torch.prepare_model(
        dis, parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizers = make_optimizers(unit, dis, config)
    if saved is None:
        return unit_w, dis_w, optimizers, 0
    optimizers.load_state_dict(saved["optimizers"])
    return unit_w, dis_w, optimizers, int(saved["iteration"])


def disc_augment(config: UnitConfig, device: torch.device, seed: int) -> Augment | None:
    """The config's DiffAugment policy with its own seeded generator; None when it is off (no
    random numbers drawn, so a run without it is unchanged)."""
    policy = DiffAugment(config.disc_augment, config.disc_augment_strength)
    if not policy.active:
        return None
    generator = torch.Generator(device=device).manual_seed(seed)
    return lambda x: policy(x, generator)


def _train_worker(train_loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train loop: DDP UNIT training from the last checkpoint to `config.iterations`, then
    (rank 0) the final weights, the registered translator and the manifest."""
    import ray.train
    import ray.train.torch

    quiet_ray()  # this worker's Ray Data plans go to its log files, as the driver's do
    loop: UnitLoop = train_loop_config["loop"]
    config = loop.config
    weights, arch = LossWeights.from_config(config), UnitArch.from_config(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    batch_size = max(1, config.batch_size // world)
    torch.set_num_threads(loop.torch_threads)

    unit_w, dis_w, optimizers, start = _networks(config, weights, arch, rank, device)
    streams = {
        name: PatchStream(ray.train.get_dataset_shard(name), batch_size=batch_size,
                          size=loop.patch_size, seed=seed_for(config.seed, rank, start, i),
                          device=device, name=name)
        for i, name in enumerate(("normal", "lesion"))
    }
    noise = torch.Generator(device=device).manual_seed(seed_for(config.seed, rank, start, 7))
    augment = disc_augment(config, device, seed_for(config.seed, rank, start, 8))
    side = _Rank0(loop) if rank == 0 else None
    meter = LossMeter()
    last: dict[str, float] = {}
    quality: dict[str, float] = {}
    end = config.iterations

    for it in range(start + 1, end + 1):
        x_h, x_l = next(streams["normal"]), next(streams["lesion"])
        if side is not None:
            side.keep_samples(x_h, x_l)
        extra = [(next(streams["normal"]), next(streams["lesion"]))
                 for _ in range(config.disc_steps - 1)]
        meter.add(train_iteration(unit_w, dis_w, x_h, x_l, weights=weights, optimizers=optimizers,
                                  generator=noise, augment=augment, extra_d=extra))
        if it % config.log_every == 0 or it == end:
            last = {f"loss/{k}": v for k, v in meter.reduce().items()}
            last["lr"] = optimizers.g.param_groups[0]["lr"]
            if side is not None:
                side.log_metrics(last, it)
        if side is not None and (it % config.sample_every == 0 or it == end):
            quality = side.sample_and_probe(unit_w, dis_w, it)
            side.log_metrics(quality, it)
            shown = {k: v for k, v in (last | quality).items() if k in PROGRESS_KEYS}
            log.info("[unit] iteration %d/%d: %s", it, end,  # (Ray Train's print doubles lines)
                     ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in shown.items()))
        if it % config.checkpoint_every == 0 or it == end:
            sums = gather(checksum(unit_w, dis_w))
            metrics = {"iteration": it, "resumed_from": start, **last, **quality,
                       **{f"checksum/rank{r}": c for r, c in enumerate(sums)}}
            state = (training_state(unit_w, dis_w, optimizers, arch, config, it) if rank == 0
                     else None)
            _report(metrics, state)

    if side is None:
        return None
    final = training_state(unit_w, dis_w, None, arch, config, end)
    return _publish(loop, final, last, quality, side)


def _publish(loop: UnitLoop, final: dict[str, Any], losses: Mapping[str, float],
             quality: Mapping[str, float], side: _Rank0) -> dict[str, Any]:
    """Rank 0: final weights, the translator logged (and registered), then the manifest."""
    import mlflow

    from boneaug import storage, tracking
    from boneaug.augment.translate import translator_from_state
    from boneaug.config import TrackingConfig

    unit_uri, endpoint = loop.unit_uri, loop.s3_endpoint
    buffer = io.BytesIO()
    torch.save(final, buffer)
    final_uri = storage.join(unit_uri, FINAL_FILE)
    storage.write_bytes(final_uri, buffer.getvalue(), endpoint_url=endpoint)

    translator = translator_from_state(final)
    example = (np.zeros((1, 1, loop.patch_size, loop.patch_size), np.float32)
               if side.samples is None else ((side.samples[0][:1].float().cpu().numpy() + 1) / 2))
    tracking.configure(TrackingConfig(tracking_uri=loop.tracking_uri))
    with mlflow.start_run(run_id=loop.mlflow_run_id):
        version = tracking.log_torch_model(
            translator, name="translator", input_example=example,
            registered_name=loop.registered_name, alias=loop.alias)
        mlflow.set_tags({"final_uri": final_uri, "direction": "h2l"})
    registered = loop.registered_name
    content = {
        "iterations": int(final["iteration"]),
        "model_version": version,
        "model_uri": (f"models:/{registered}/{version}" if registered
                      else f"runs:/{loop.mlflow_run_id}/translator"),
        "final_uri": final_uri,
        "mlflow_run_id": loop.mlflow_run_id,
        "run_uri": loop.run_uri,
        "losses": dict(losses),
        "frac_source": quality.get("quality/frac_source"),
        "frac_translated": quality.get("quality/frac_translated"),
        "fd_ratio": quality.get("quality/fd_ratio"),
        "kid_translated": quality.get("quality/kid_translated"),
        "kid_source": quality.get("quality/kid_source"),
        "critic_accuracy": loop.critic["accuracy"] if loop.critic is not None else None,
        "critic_heldout_auc": (loop.critic["heldout_auc"] if loop.critic is not None
                               else None),
        "instrument": {k.split("/")[1]: v for k, v in quality.items()
                       if k.startswith("instrument/")} or None,
    }
    storage.publish_manifest(unit_uri, content, endpoint_url=endpoint)
    return content


# ---- driver-side API -----------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitResult:
    """A finished UNIT training (the manifest under ``<run_uri>/unit``)."""

    iterations: int
    model_version: str | None
    model_uri: str  # models:/boneaug-unit-<part>/<version>, or runs:/<id>/translator
    final_uri: str  # <run_uri>/unit/final.pt: arch, config, iteration, UNIT weights
    mlflow_run_id: str
    run_uri: str
    losses: dict[str, float] = field(default_factory=dict)  # last logged window, all ranks
    frac_source: float | None = None  # quality signal at the end (None without quality_sets)
    frac_translated: float | None = None
    fd_ratio: float | None = None  # critic-feature distance to real lesions (see eval.quality)
    # KID to the real lesion patches in the critic's features: translations, untranslated sources
    kid_translated: float | None = None
    kid_source: float | None = None
    critic_accuracy: float | None = None
    critic_heldout_auc: float | None = None  # how far to trust the quality signal (0.5: not)
    # the instrument's lesion-call rates at the end (translated, source, real_lesion), or None
    instrument: dict[str, float] | None = None

    @property
    def quality_gain(self) -> float | None:
        """frac_translated - frac_source: the Tune objective (higher is better)."""
        if self.frac_source is None or self.frac_translated is None:
            return None
        return self.frac_translated - self.frac_source

    @classmethod
    def from_manifest(cls, content: Mapping[str, Any]) -> UnitResult:
        return cls(**{k: content[k] for k in cls.__dataclass_fields__ if k in content})


def registered_unit_name(body_part: str) -> str:
    return f"boneaug-unit-{body_part}"


def _check_patches(ds: ray.data.Dataset, name: str) -> tuple[ray.data.Dataset, int, int]:
    """(dataset with the patch columns only, rows, patch side)."""
    missing = [c for c in PATCH_COLUMNS if c not in ds.columns()]
    if missing:
        raise DataError(
            f"{name} patches lack columns {missing} (have {ds.columns()}); UNIT reads patch-set "
            "rows (height, width, pixels as boneaug.data.arrays.encode_pixels) - see CONTRACTS.md"
        )
    ds = ds.select_columns(list(PATCH_COLUMNS), num_cpus=FEED_CPUS)
    n = ds.count()
    if n == 0:
        raise DataError(f"the {name} patch set is empty")
    first = ds.take(1)[0]
    if first["height"] != first["width"]:
        raise DataError(
            f"{name} patches are {first['height']}x{first['width']}: UNIT needs square patches")
    return ds, n, int(first["height"])


def _quality_critic(config: UnitConfig, sets: QualitySets,
                    critic_config: CriticConfig | None) -> dict[str, Any]:
    """The patch critic of the quality signal, trained here (driver) on the translation sets, as
    the loop's rank 0 rebuilds it."""
    from boneaug.eval.quality import CriticConfig as _CriticConfig
    from boneaug.eval.quality import QualityProbe, subset_patches

    critic_config = critic_config or _CriticConfig(steps=config.critic_steps, seed=config.seed)
    probe, report = QualityProbe.train(sets, critic_config)
    log.debug("quality critic: train accuracy %.3f, held-out AUC %s, frac_source %.3f",
              report.train_accuracy,
              "n/a" if report.heldout_auc is None else f"{report.heldout_auc:.3f}",
              probe.frac_source)
    return {"arch": probe.critic.spec, "state": probe.critic.state_dict(),
            "threshold": report.threshold,
            "source": probe.source, "accuracy": report.train_accuracy,
            "heldout_auc": report.heldout_auc,
            "lesion": subset_patches(sets.lesion, 256), "normal": subset_patches(sets.normal, 256)}


def _instrument_spec(instrument: tuple[nn.Module, float] | None,
                     quality_sets: QualitySets | None) -> dict[str, Any] | None:
    """What rank 0 needs to rebuild the instrument critic (its verdict needs the sources)."""
    if instrument is None:
        return None
    if quality_sets is None:
        raise ValueError("an instrument critic judges the translations of the quality sets' "
                         "sources: pass quality_sets too")
    from boneaug.models.specs import spec_of

    critic, cut = instrument
    return {"arch": spec_of(critic), "state": critic.state_dict(), "threshold": cut}


def _check_run(config: UnitConfig, num_workers: int) -> None:
    """Refuse what cannot train before any work starts: local mode, invalid loss weights."""
    if num_workers < 1:
        raise ValueError(
            f"num_workers={num_workers}: UNIT training needs Ray Train workers (>= 1); local mode "
            "(0) keeps checkpoints in memory only, so it could neither resume nor retry"
        )
    LossWeights.from_config(config)


def _check_sets(config: UnitConfig, lesion: ray.data.Dataset, normal: ray.data.Dataset,
                num_workers: int) -> tuple[dict[str, ray.data.Dataset], dict[str, int]]:
    """The two patch sets, checked: one patch size the architecture takes, and enough patches
    for every worker's share of a batch."""
    lesion, n_lesion, size = _check_patches(lesion, "lesion")
    normal, n_normal, size_n = _check_patches(normal, "normal")
    if size_n != size:
        raise DataError(
            f"lesion patches are {size}^2 but normal patches {size_n}^2: use one patch run")
    multiple = UnitArch.from_config(config).multiple
    if size % multiple or size < 4 * multiple:
        raise DataError(f"patch side {size} must be a multiple of {multiple} and >= {4 * multiple} "
                        f"for n_downsample={config.n_downsample}")
    per_worker = max(1, config.batch_size // num_workers)
    if min(n_lesion, n_normal) // num_workers < per_worker:
        raise DataError(
            f"{n_lesion} lesion / {n_normal} normal patches cannot give {num_workers} workers "
            f"{per_worker} patches each per batch: lower num_workers or batch_size"
        )
    return ({"lesion": lesion, "normal": normal},
            {"lesion_n": n_lesion, "normal_n": n_normal, "patch_size": size})


def _run_params(config: UnitConfig, data: dict[str, Any], workers: Workers, run_uri: str,
                critic: dict[str, Any] | None) -> dict[str, Any]:
    """The MLflow params of a UNIT run: the config, the patch sets, the workers, the critic."""
    return {
        "unit": config.model_dump(), "data": data, "num_workers": workers.num_workers,
        "per_worker_batch": max(1, config.batch_size // workers.num_workers),
        "use_gpu": workers.use_gpu, "run_uri": run_uri,
        "critic": ({k: critic["arch"][k] for k in ("width", "size")}
                   | {k: critic[k] for k in ("threshold", "accuracy", "heldout_auc")}
                   | {"source_n": len(critic["source"])}) if critic else "none",
    }


def fit_unit(
    config: UnitConfig,
    lesion: ray.data.Dataset,
    normal: ray.data.Dataset,
    *,
    publish: Publish,
    workers: Workers,
    quality_sets: QualitySets | None = None,
    critic_config: CriticConfig | None = None,
    instrument: tuple[nn.Module, float] | None = None,
) -> UnitResult:
    """Train UNIT with Ray Train (DDP over ``workers.num_workers`` >= 1; local mode is refused:
    it keeps checkpoints in memory only) on lesion / normal patch sets: Ray Datasets of patch-set
    rows (CONTRACTS.md), an equal shard of each per worker. ``config.batch_size`` is the global
    batch: each worker takes ``batch_size // num_workers`` (at least 1) per domain.

    Under ``<publish.run_uri>/unit``: Ray checkpoints (``train/checkpoint_*/state.pt``) every
    ``checkpoint_every`` iterations, ``final.pt`` and ``_MANIFEST.json``. A stopped run resumes
    from its last checkpoint when called again; worker failures are retried
    ``workers.max_failures`` times within one call; a finished run is returned as is unless
    ``publish.overwrite``.

    MLflow (rank 0 writes): the config as params, the losses every ``log_every`` iterations, a
    sample grid, the quality signal (a patch critic trained here first on `quality_sets`) and
    D's real-vs-translated AUCs every ``sample_every``, and the h -> l `Translator`, registered
    as ``publish.registered_name`` with ``publish.alias``. `instrument` (a lesion critic and its
    cut, e.g. the phantom critic) adds its lesion-call rates on translated and untranslated
    sources and on real lesion patches to those logs and the manifest, and does nothing else.
    """
    from boneaug import storage, tracking
    from boneaug.config import TrackingConfig as _Tracking

    _check_run(config, workers.num_workers)
    unit_uri = storage.join(publish.run_uri, "unit")
    if (done := finished_run(unit_uri, publish.overwrite)) is not None:
        return UnitResult.from_manifest(done)
    datasets, data = _check_sets(config, lesion, normal, workers.num_workers)
    critic = None if quality_sets is None else _quality_critic(config, quality_sets,
                                                                critic_config)
    uri = tracking.tracking_uri(publish.tracking)
    name = publish.name("unit", publish.run_uri)
    with tracking.start_run(publish.experiment, name,
                            _run_params(config, data, workers, publish.run_uri, critic),
                            tracking=_Tracking(tracking_uri=uri),
                            run_id=publish.mlflow_run_id) as run:
        loop = UnitLoop(
            config=config, patch_size=data["patch_size"], critic=critic, unit_uri=unit_uri,
            instrument=_instrument_spec(instrument, quality_sets), run_uri=publish.run_uri,
            s3_endpoint=storage.s3_endpoint() if storage.is_s3(publish.run_uri) else None,
            tracking_uri=uri, mlflow_run_id=run.info.run_id,
            registered_name=publish.registered_name, alias=publish.alias)
        done = run_ray_train(_train_worker, loop, workers=workers,
                             storage_uri=storage.join(unit_uri, "train"), datasets=datasets)
    return UnitResult.from_manifest(done)


__all__ = [
    "GRID_LABEL_WIDTH", "GRID_ROWS", "LossMeter", "LossWeights", "Optimizers", "PatchStream",
    "UnitResult", "checksum", "d_step", "decode_patch_batch", "disc_augment",
    "discriminator_aucs", "fit_unit", "g_step", "generate", "kl_loss", "l1_loss", "lsgan_d_loss",
    "lsgan_g_loss", "make_optimizers", "registered_unit_name", "sample_grid", "train_iteration",
    "training_state",
]
