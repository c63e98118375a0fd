"""A quality signal for a healthy -> lesion translator: does a lesion detector believe it?

A small CNN patch critic is trained (seeded, 1000 steps, seconds on a CPU) to tell real lesion
patches from real non-lesion patches, e.g. the UNIT translation sets. Every training patch of
either class is flipped, shifted and blurred at random (`degrade`), so none of these carries the
label and a translator cannot score by blurring or shifting. Then, on
held-out non-lesion *source* patches (the ones augmentation will translate):

- ``frac_source``: the fraction of the untranslated source patches the critic calls lesion
  (its false-positive rate on them; the floor),
- ``frac_translated``: the fraction of their translations it calls lesion,
- ``gain = frac_translated - frac_source``.

A translator that paints convincing lesions drives ``frac_translated`` up; one that leaves
patches alone keeps it at ``frac_source``; `gain` is the Tune objective for UNIT sweeps.

A classifier's verdict on out-of-distribution input is arbitrary: an untrained generator's noise
can be "lesion" to it (seen in training at iteration 2: frac_translated 1.0). So the probe also
reports ``fd_ratio``: the (diagonal) Frechet distance between the critic's features of the
translations and of real lesion patches, divided by the same distance between real non-lesion
and real lesion patches. 0 means the translations look like real lesion patches to the critic,
about 1 as far from them as healthy patches are, well above 1 unlike anything real. Read `gain`
only together with a small ``fd_ratio`` (e.g. Tune: maximise gain subject to fd_ratio < 1). The
critic sees patches resized to at most `CriticConfig.size` pixels a side (area averaging), so
the signal is cheap for 256-pixel patches too. It is a proxy, not the paper's end metric
(classifier AUC after augmentation), and a critic that separates the real sets poorly makes it
noisy: `CriticReport.heldout_auc` says how well a critic trained the same way separates real
patches it never saw (local humerus: 0.85-0.89 over two seeds; without the degradations,
0.69-0.73).

Pure functions (`train_critic`, `lesion_fraction`, `quality_signal`) and one small class
(`QualityProbe`) that holds a trained critic and the source patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boneaug.eval.metrics import kernel_distance, roc_auc, roc_counts


@dataclass(frozen=True)
class CriticConfig:
    """Training settings of the patch critic (defaults: 1000 steps, ~15 s on 2 cores, twice
    that with the held-out check)."""

    size: int = 32  # patches are area-downsampled to at most this side
    width: int = 16
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # probability at or above which a patch is called lesion; None: calibrated on the training
    # patches (the threshold that best separates them, Youden's J), as batch statistics and a
    # short schedule leave the raw probabilities off-centre
    threshold: float | None = None
    # label-independent degradations of every training patch (see `degrade`): blur up to this
    # sigma (critic pixels; 0: none) and shifts up to size / 8. (Added noise was tried too: the
    # critic then called pure noise lesion.)
    max_blur: float = 1.0
    shift: bool = True
    # fraction of each class held out to measure the critic's AUC on patches it never saw (a
    # second, same-seeded critic on the rest); 0 skips it
    holdout: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 8 or self.width < 1 or self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"invalid critic settings {self}: size >= 8, width, steps >= 1, batch >= 2")
        if self.max_blur < 0 or not 0 <= self.holdout < 1:
            raise ValueError(f"invalid critic settings {self}: max_blur >= 0, 0 <= holdout < 1")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


class PatchCritic(nn.Module):
    """x (B, 1, S, S) in [0, 1] -> lesion logit (B,). Three conv-BN stages, global average pool.

    Each patch is standardised first (zero mean, unit contrast): exposure and bone density vary
    more between radiographs than a lucent lesion changes a patch, and without it the critic
    learnt brightness. On the local humerus sets (held-out half) this raised the critic's AUC
    from 0.41 to 0.67; BatchNorm lets a few hundred steps fit the training patches.
    """

    def __init__(self, width: int = 16, size: int = 32) -> None:
        super().__init__()
        self.size = size
        w = width

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *stage(1, w), nn.MaxPool2d(2), *stage(w, 2 * w), nn.MaxPool2d(2), *stage(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * w, 1)
        self.spec = {"kind": "patch_critic", "width": width, "size": size}  # models.specs

    def embed(self, x: Tensor) -> Tensor:
        """(B, 1, S, S) in [0, 1] -> penultimate features (B, 4 * width)."""
        return self.features(standardize(shrink(x, self.size))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))[:, 0]


class CriticEnsemble(nn.Module):
    """Patch critics of one architecture, trained with different seeds: x (B, 1, S, S) -> the
    logit of their mean lesion probability (B,). One critic's calls on healthy patches can move
    with a change no lesion makes (a 1 px blur, faint noise), and which change depends on its
    seed; the mean of a few does not (see `boneaug.eval.phantom_critic.MEMBERS`)."""

    def __init__(self, members: Sequence[PatchCritic]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a critic ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.size = members[0].size
        self.spec = {"kind": "critic_ensemble", "members": len(members),
                     "width": members[0].spec["width"], "size": self.size}  # models.specs

    def forward(self, x: Tensor) -> Tensor:
        p = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-6)


def shrink(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> area-averaged to at most `size` a side (unchanged when already small)."""
    if max(x.shape[-2:]) <= size:
        return x
    scale = size / max(x.shape[-2:])
    out = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
    return F.interpolate(x, size=out, mode="area")


def standardize(x: Tensor, floor: float = 0.02) -> Tensor:
    """Each (C, H, W) patch minus its mean, over its standard deviation (at least `floor`)."""
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    std = x.std(dim=(-3, -2, -1), keepdim=True).clamp_min(floor)
    return (x - mean) / std


def youden_threshold(p_pos: np.ndarray, p_neg: np.ndarray) -> float:
    """The probability cut that maximises TPR - FPR between two score sets (midpoint of the gap)."""
    labels = np.r_[np.ones(len(p_pos), np.int64), np.zeros(len(p_neg), np.int64)]
    tps, fps, desc = roc_counts(labels, np.concatenate([p_pos, p_neg]))  # cut >= desc[k]
    j = tps / len(p_pos) - fps / len(p_neg)
    cuts = np.r_[(desc[:-1] + desc[1:]) / 2, desc[-1:]]  # same counts as >= desc[k]
    return float(cuts[len(j) - 1 - int(np.argmax(j[::-1]))])  # the lowest cut among ties


def _as_patches(patches: np.ndarray, name: str) -> np.ndarray:
    patches = np.asarray(patches, dtype=np.float32)
    if not patches.flags.writeable:  # e.g. from Ray's object store: torch warns on these
        patches = patches.copy()
    if patches.ndim != 4 or patches.shape[1] != 1 or len(patches) == 0:
        raise ValueError(
            f"{name} must be a non-empty (N, 1, S, S) array, got shape {patches.shape}")
    return patches


@dataclass(frozen=True)
class CriticReport:
    """What `train_critic` returns besides the model."""

    train_accuracy: float  # on the (real) training patches at the threshold
    final_loss: float
    threshold: float  # the lesion cut used (configured or calibrated)
    # ROC AUC on held-out real patches of a critic trained without them (None: holdout 0 or
    # too few patches). How far to trust the signal: 0.5 is a critic that learnt nothing general
    heldout_auc: float | None = None


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """(B, C, H, W) blurred per patch with its own sigma (B,) in pixels (0 leaves it); reflect."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp_min(1e-3)[:, None].to(x)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: Tensor, config: CriticConfig, generator: torch.Generator) -> Tensor:
    """Random flips, shifts (up to 1/8 of the side) and blur, drawn per patch.

    They are applied to lesion and healthy training patches alike, so they carry no label: a
    translator's usual failure modes (blur, a shifted bone) cannot read as lesion, and
    only what differs between the classes, the lesion itself, separates them. On the local humerus
    sets they also raised the critic's held-out AUC at 1000 steps from 0.73 to 0.85-0.89.
    """
    b, _, h, w = x.shape
    flips = torch.rand(2, b, generator=generator) < 0.5
    x = torch.where(flips[0, :, None, None, None], x.flip(-1), x)
    x = torch.where(flips[1, :, None, None, None], x.flip(-2), x)
    if config.shift:
        s = max(1, min(h, w) // 8)
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[:, None, None],
                   rows, cols]
    if config.max_blur > 0:
        x = gaussian_blur(x, torch.rand(b, generator=generator) * config.max_blur)
    return x


def paired_batch(pos: Tensor, neg: Tensor, n: int, config: CriticConfig,
                 generator: torch.Generator) -> Tensor:
    """`n` pairs drawn at random (pos[i] and neg[i]: one crop with and without a lesion), each
    degraded as one (`degrade`: the same flips, shift and blur for both): (2n, 1, S, S), the
    lesion patches first. Within a batch the classes then differ in the lesion alone."""
    i = torch.randint(len(pos), (n,), generator=generator)
    both = degrade(torch.cat([pos[i], neg[i]], 1), config, generator)
    return torch.cat([both[:, :1], both[:, 1:]])


def _fit_critic(pos: Tensor, neg: Tensor, config: CriticConfig, *,
                paired: bool = False) -> tuple[PatchCritic, float]:
    """A seeded critic trained on class-balanced, degraded batches; (model in eval mode, loss).
    `paired`: pos[i] and neg[i] are one pair, drawn and degraded together (`paired_batch`)."""
    if paired and len(pos) != len(neg):
        raise ValueError(f"paired training needs as many lesion as healthy patches, got "
                         f"{len(pos)} and {len(neg)}")
    gen = torch.Generator().manual_seed(config.seed)
    critic = PatchCritic(config.width, config.size)
    for m in critic.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            nn.init.zeros_(m.bias)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    half = config.batch_size // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)])
    critic.train()
    loss = torch.zeros(())
    for _ in range(config.steps):
        if paired:
            x = paired_batch(pos, neg, half, config, gen)
        else:
            x = degrade(torch.cat([pos[torch.randint(len(pos), (half,), generator=gen)],
                                   neg[torch.randint(len(neg), (half,), generator=gen)]]),
                        config, gen)
        loss = F.binary_cross_entropy_with_logits(critic(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return critic.eval(), float(loss.detach())


def _heldout_auc(pos: Tensor, neg: Tensor, config: CriticConfig) -> float | None:
    """AUC on a seeded `holdout` fraction of each class of a critic fit on the rest."""
    n_pos, n_neg = round(len(pos) * config.holdout), round(len(neg) * config.holdout)
    if n_pos < 2 or n_neg < 2 or len(pos) - n_pos < 2 or len(neg) - n_neg < 2:
        return None
    gen = torch.Generator().manual_seed(config.seed + 1)
    ip, in_ = torch.randperm(len(pos), generator=gen), torch.randperm(len(neg), generator=gen)
    critic, _ = _fit_critic(pos[ip[n_pos:]], neg[in_[n_neg:]], config)
    p_pos = lesion_probability(critic, pos[ip[:n_pos]].numpy())
    p_neg = lesion_probability(critic, neg[in_[:n_neg]].numpy())
    return roc_auc(np.r_[np.ones(n_pos), np.zeros(n_neg)], np.r_[p_pos, p_neg])


def train_critic(
    lesion: np.ndarray,  # (N_l, 1, S, S) float32 in [0, 1]
    normal: np.ndarray,  # (N_n, 1, S, S)
    config: CriticConfig = CriticConfig(),
) -> tuple[PatchCritic, CriticReport]:
    """A seeded critic on all patches (CPU, eval mode out), its threshold, and its held-out AUC."""
    lesion, normal = _as_patches(lesion, "lesion"), _as_patches(normal, "normal")
    pos = shrink(torch.from_numpy(lesion), config.size)
    neg = shrink(torch.from_numpy(normal), config.size)
    heldout = _heldout_auc(pos, neg, config) if config.holdout > 0 else None
    critic, loss = _fit_critic(pos, neg, config)
    p_pos = lesion_probability(critic, pos.numpy())  # already shrunk: the critic's input size
    p_neg = lesion_probability(critic, neg.numpy())
    cut = config.threshold if config.threshold is not None else youden_threshold(p_pos, p_neg)
    accuracy = float(((p_pos >= cut).sum() + (p_neg < cut).sum()) / (len(p_pos) + len(p_neg)))
    return critic, CriticReport(train_accuracy=accuracy, final_loss=loss, threshold=cut,
                                heldout_auc=heldout)


@torch.no_grad()
def lesion_probability(
    critic: nn.Module, patches: np.ndarray, *, batch_size: int = 256
) -> np.ndarray:
    """(N, 1, S, S) in [0, 1] -> (N,) lesion probabilities, on the critic's device."""
    patches = _as_patches(patches, "patches")
    device = next(critic.parameters()).device
    out = [torch.sigmoid(critic(torch.from_numpy(patches[i : i + batch_size]).to(device))).cpu()
           for i in range(0, len(patches), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def critic_features(
    critic: PatchCritic, patches: np.ndarray, *, batch_size: int = 256
) -> np.ndarray:
    """(N, 1, S, S) in [0, 1] -> (N, F) float64 penultimate features."""
    patches = _as_patches(patches, "patches")
    device = next(critic.parameters()).device
    out = [critic.embed(torch.from_numpy(patches[i : i + batch_size]).to(device)).double().cpu()
           for i in range(0, len(patches), batch_size)]
    return torch.cat(out).numpy()


def diagonal_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians with the per-feature means and variances of rows of
    `a` and `b` (N, F): |mu_a - mu_b|^2 + |sigma_a - sigma_b|^2 (stable with few samples)."""
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + ((a.std(0) - b.std(0)) ** 2).sum())


def lesion_fraction(critic: nn.Module, patches: np.ndarray, *, threshold: float = 0.5) -> float:
    """Fraction of `patches` the critic calls lesion (probability >= threshold)."""
    return float((lesion_probability(critic, patches) >= threshold).mean())


@dataclass(frozen=True)
class QualitySignal:
    frac_source: float
    frac_translated: float
    fd_ratio: float | None = None  # feature distance to real lesions / healthy-to-lesion distance
    # KID to the real lesion patches in the critic's features: of the translations, of the
    # untranslated sources (None without reference patches)
    kid_translated: float | None = None
    kid_source: float | None = None

    @property
    def gain(self) -> float:
        return self.frac_translated - self.frac_source

    @property
    def kid_ratio(self) -> float | None:
        """kid_translated / kid_source: below 1, the translations are nearer the real lesion
        patches than their sources were (None where the sources are already at KID <= 0)."""
        if self.kid_translated is None or self.kid_source is None or self.kid_source <= 0:
            return None
        return self.kid_translated / self.kid_source

    def as_metrics(self, prefix: str = "quality/") -> dict[str, float]:
        optional = {"fd_ratio": self.fd_ratio, "kid_translated": self.kid_translated,
                    "kid_source": self.kid_source, "kid_ratio": self.kid_ratio}
        return {f"{prefix}frac_source": self.frac_source,
                f"{prefix}frac_translated": self.frac_translated, f"{prefix}gain": self.gain,
                **{f"{prefix}{k}": v for k, v in optional.items() if v is not None}}


def quality_signal(
    critic: nn.Module, source: np.ndarray, translated: np.ndarray, *, threshold: float = 0.5
) -> QualitySignal:
    """The critic's lesion fractions on source patches and on their translations."""
    if np.shape(source) != np.shape(translated):
        raise ValueError(
            f"source {np.shape(source)} and translated {np.shape(translated)} differ in shape")
    return QualitySignal(frac_source=lesion_fraction(critic, source, threshold=threshold),
                         frac_translated=lesion_fraction(critic, translated, threshold=threshold))


@dataclass(frozen=True)
class QualitySets:
    """Real patches to train the critic on, and source patches to translate (all (N, 1, S, S))."""

    lesion: np.ndarray
    normal: np.ndarray
    source: np.ndarray


class QualityProbe:
    """A trained critic plus source patches: `probe(translate)` -> `QualitySignal`.

    `translate` maps (N, 1, S, S) float32 [0, 1] -> the same shape (e.g.
    ``functools.partial(translate_patches, translator)``). `frac_source` and the reference feature
    statistics are computed once. Without `lesion` / `normal` reference patches, `fd_ratio` and
    the KIDs are None.

    KID (`boneaug.eval.metrics.kernel_distance`) is measured in the critic's penultimate features:
    a feature space that exists on real data (the critic learnt it from the real lesion and normal
    patches). It is reported, never optimised: on the demo's tibia sets the local UNIT's
    translations are at 0.19-0.35 of their sources' KID to the real lesions (critic seeds 0 and
    1), and a classifier's pooled features were shown to reward global statistics alone.
    """

    def __init__(self, critic: PatchCritic, source: np.ndarray, *, threshold: float = 0.5,
                 lesion: np.ndarray | None = None, normal: np.ndarray | None = None) -> None:
        self.critic = critic.eval()
        self.source = _as_patches(source, "source")
        self.threshold = threshold
        self.frac_source = lesion_fraction(self.critic, self.source, threshold=threshold)
        self._lesion_features = None
        self._scale = None
        self._kid_source = None
        if lesion is not None and normal is not None:
            self._lesion_features = critic_features(self.critic, lesion)
            self._scale = max(diagonal_frechet(critic_features(self.critic, normal),
                                               self._lesion_features), 1e-12)
            self._kid_source = kernel_distance(critic_features(self.critic, self.source),
                                               self._lesion_features)[0]

    @classmethod
    def train(
        cls,
        sets: QualitySets,
        config: CriticConfig = CriticConfig(),
        *,
        max_source: int | None = 256,
    ) -> tuple[QualityProbe, CriticReport]:
        """Train the critic on `sets.lesion` / `sets.normal` (also the fd_ratio references); keep
        up to `max_source` source patches (an evenly spaced subset: a deterministic choice)."""
        critic, report = train_critic(sets.lesion, sets.normal, config)
        probe = cls(critic, subset_patches(sets.source, max_source), threshold=report.threshold,
                    lesion=subset_patches(sets.lesion, max_source),
                    normal=subset_patches(sets.normal, max_source))
        return probe, report

    def __call__(self, translate: Callable[[np.ndarray], np.ndarray]) -> QualitySignal:
        translated = translate(self.source)
        if translated.shape != self.source.shape:
            raise ValueError(
                f"translate returned shape {translated.shape}, expected {self.source.shape}")
        fd_ratio = kid = None
        if self._lesion_features is not None and self._scale is not None:
            features = critic_features(self.critic, translated)
            fd_ratio = diagonal_frechet(features, self._lesion_features) / self._scale
            kid = kernel_distance(features, self._lesion_features)[0]
        return QualitySignal(frac_source=self.frac_source,
                             frac_translated=lesion_fraction(self.critic, translated,
                                                             threshold=self.threshold),
                             fd_ratio=fd_ratio, kid_translated=kid, kid_source=self._kid_source)


def subset_patches(patches: np.ndarray, limit: int | None) -> np.ndarray:
    """At most `limit` patches, evenly spaced through the array (deterministic)."""
    patches = _as_patches(patches, "patches")
    if limit is None or len(patches) <= limit:
        return patches
    return patches[np.linspace(0, len(patches) - 1, limit).round().astype(int)]


__all__ = [
    "CriticConfig", "CriticEnsemble", "CriticReport", "PatchCritic", "QualityProbe", "QualitySets",
    "QualitySignal", "critic_features", "degrade", "diagonal_frechet", "gaussian_blur",
    "lesion_fraction", "lesion_probability", "paired_batch", "quality_signal", "shrink",
    "standardize", "subset_patches", "train_critic", "youden_threshold",
]
