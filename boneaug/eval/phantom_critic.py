"""The phantom lesion critic: an instrument that texture cannot fool (SPEC 9).

A patch critic trained on the ~100 real lesion patches of a translation set learns whatever
separates them from healthy ones, and a translator can satisfy it with texture. The phantom can
do what no real cohort can: render the same crop of the same radiograph with and without a
lesion, as often as needed. A critic trained on thousands of such *pairs* sees the two classes
differ in the lesion alone (the anatomy, exposure, noise and crop are shared), so the lesion is
the only thing it can learn.

- Pairs come from a cohort the phantom generates with another seed (`PAIR_SEED_OFFSET`): other
  patients, other images; the critic never sees the cohort's own lesions.
- Each pair: a healthy training image of that cohort, a lesion drawn from the cohort's lesion
  distribution at a random place on the shaft (`boneaug.synth.phantom.render_with_lesion`), the
  patch rule's crop around its box (side s x the box's larger side, placed at random so that it
  holds the box: SPEC 2), resized to the UNIT patch size; the same crop of the image without it.
- Training: an ensemble (`MEMBERS`) of `boneaug.eval.quality`'s PatchCritic (standardised
  input), each seeded apart and trained on paired batches: a pair's two patches are drawn
  together and get the same label-free degradation (flips, shift, blur), so within a batch the
  classes differ in the lesion alone.

It is an instrument only: nothing in the method trains on it or selects by it (a real cohort has
no phantom), so `boneaug.train`, `boneaug.augment` and `boneaug.tune` never import this module.
Jobs hand its verdict to the UNIT trainer as an opaque probe for logging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from boneaug.config import SynthConfig
from boneaug.eval.metrics import roc_auc
from boneaug.eval.quality import (
    CriticConfig,
    CriticEnsemble,
    PatchCritic,
    _fit_critic,
    gaussian_blur,
    lesion_probability,
    shrink,
    youden_threshold,
)

Box = tuple[int, int, int, int]
PAIR_SEED_OFFSET = 7919  # the paired cohort's seed: the cohort's + this (other patients)
SHAFT_TRIES = 20  # random shaft places tried per pair until one projects into the frame


@dataclass(frozen=True)
class PairSet:
    """Paired patches (N, 1, S, S) float32 [0, 1]: lesion[i] and healthy[i] are the same crop
    of the same image, with and without the lesion; box[i] is the lesion's box in patch pixels."""

    lesion: np.ndarray
    healthy: np.ndarray
    boxes: list[Box]


def _healthy_ids(synth: SynthConfig, body_part: str, seed: int) -> list[str]:
    """Clean, lesion-free training images of the paired cohort's plan."""
    from boneaug.synth.cohort import plan_body_part

    return [j.image_id for j in plan_body_part(synth, body_part, seed=seed, scale=1.0)
            if j.split == "train" and j.label == 0 and not j.confounders]


def _shaft_box(synth: SynthConfig, image_id: str, seed: int, rng: np.random.Generator,
               half: int) -> Box | None:
    """A small box around a random point of the shaft's centre line that projects inside the
    frame (with a margin of 2 x `half`), or None."""
    from boneaug.synth.anatomy import build_scene, project_point
    from boneaug.synth.phantom import image_spec
    from boneaug.synth.spec import image_pixel

    spec, _ = image_spec(synth, image_id, seed=seed)
    scene = build_scene(spec.body_part, spec.patient.body, spec.omega_deg)
    zones = [span for spans in scene.lesion_zones.values() for span in spans]
    for _ in range(SHAFT_TRIES):
        lo, hi = zones[int(rng.integers(len(zones)))]
        (s, x, y), *_ = scene.shaft.at(float(rng.uniform(lo, hi)))
        ps, pt, _ = project_point((s, x, y), spec.omega_deg)
        px, py = image_pixel(spec, ps, pt)
        if 2 * half < px < spec.width - 2 * half and 2 * half < py < spec.height - 2 * half:
            return (int(px) - half, int(py) - half, int(px) + half, int(py) + half)
    return None


def _pair(synth: SynthConfig, body_part: str, image_id: str, seed: int, size: int, s: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Box] | None:
    from boneaug.data.patches import crop_resize, square_crop
    from boneaug.synth.phantom import render_with_lesion

    half = max(4, synth.height // 64)
    target = _shaft_box(synth, image_id, seed, rng, half)
    if target is None:
        return None
    render = render_with_lesion(synth, image_id, seed=seed, target=target, rng=rng)
    x0, y0, x1, y1 = render.box
    crop = square_crop(render.box, render.without.shape, s, rng)
    scale = size / (crop[2] - crop[0])
    box = (round((x0 - crop[0]) * scale), round((y0 - crop[1]) * scale),
           round((x1 - crop[0]) * scale), round((y1 - crop[1]) * scale))
    return (crop_resize(render.with_lesion, crop, size), crop_resize(render.without, crop, size),
            box)


def _pairs_chunk(synth: SynthConfig, body_part: str, ids: list[str], seed: int, size: int,
                 s: float, stream: int) -> list[tuple[np.ndarray, np.ndarray, Box]]:
    out = []
    for k, image_id in enumerate(ids):
        made = _pair(synth, body_part, image_id, seed, size, s,
                     np.random.default_rng([seed, stream, k]))
        if made is not None:
            out.append(made)
    return out


def paired_patches(synth: SynthConfig, body_part: str, *, n: int, size: int, s: float,
                   seed: int | None = None, workers: int = 1) -> PairSet:
    """`n` pairs (about: a pair is skipped when no shaft place projects into its frame), over
    the paired cohort's healthy training images in turn, each time with a new lesion and crop;
    deterministic for a given `seed` (default: the cohort's + PAIR_SEED_OFFSET)."""
    seed = synth.seed + PAIR_SEED_OFFSET if seed is None else seed
    if seed == synth.seed:
        raise ValueError("the paired cohort must not be the cohort itself: use another seed")
    synth = synth.model_copy(update={"seed": seed})
    healthy = _healthy_ids(synth, body_part, seed)
    if not healthy:
        raise ValueError(f"the paired {body_part} cohort has no healthy training image: "
                         f"synth.counts.{body_part}.train_neg must be > 0")
    ids = [healthy[i % len(healthy)] for i in range(n)]  # each image again, with new lesions
    chunks = [ids[i:i + 32] for i in range(0, len(ids), 32)]
    args = [(synth, body_part, chunk, seed, size, s, k) for k, chunk in enumerate(chunks)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(_pairs_chunk, *zip(*args, strict=True)))
    else:
        done = [_pairs_chunk(*a) for a in args]
    made = [p for chunk in done for p in chunk]
    return PairSet(lesion=np.stack([m[0] for m in made])[:, None],
                   healthy=np.stack([m[1] for m in made])[:, None], boxes=[m[2] for m in made])


# ------------------------------------------------------------------------------ the critic


@dataclass(frozen=True)
class PhantomCritic:
    """A trained critic and the probability at which it calls a patch lesion."""

    model: CriticEnsemble | PatchCritic
    threshold: float

    def lesion_rate(self, patches: np.ndarray) -> float:
        """Share of `patches` (N, 1, S, S) it calls lesion."""
        return float((lesion_probability(self.model, patches) >= self.threshold).mean())


def registered_critic(body_part: str) -> PhantomCritic | None:
    """The registered phantom critic of `body_part` (boneaug-critic-<part>@champion, with the
    lesion cut tagged on its version), or None when `jobs/train_critic.py` has not made one."""
    from boneaug import tracking
    from boneaug.errors import ModelError

    try:
        name, version = tracking.resolve(f"models:/boneaug-critic-{body_part}@champion")
    except ModelError:
        return None
    model = tracking.load_torch_model(f"models:/{name}/{version}")
    cut = tracking.version_tags(name, str(version)).get("lesion_threshold")
    if not isinstance(model, (CriticEnsemble, PatchCritic)) or cut is None:
        return None
    return PhantomCritic(model, float(cut))


MEMBERS = 3
"""Critics in the phantom critic's ensemble, each trained on paired batches (a pair's lesion and
healthy patch drawn and degraded together). Measured with 4000 pairs and 2000 steps each, on
the tibia patch sets of a local `make demo` and on a local humerus cohort's (67 positives),
validated as jobs/train_critic.py does (real-patch AUC; the largest lesion-call rise of a
label-free perturbation of healthy patches, bar 0.05):
- one critic on independent draws of the two classes (before): tibia 0.900, +0.056 (blur
  1 px); seeds 1-4 of the same: 0.904-0.927, +0.025 to +0.063. Humerus 0.880, +0.032.
- one critic on paired batches: tibia 0.917 / 0.927, +0.007 / +0.018 (seeds 0 / 1); humerus
  0.937-0.943, but faint noise (sd 0.02) moved its calls by +0.232, -0.079 and +0.068 over
  seeds 0-2: which change a single critic reads as lesion depends on its seed.
- three on independent draws (seeds 0-2 / 3-5): tibia 0.928 / 0.919, +0.060 / +0.084.
- **three on paired batches** (seeds 0-2 / 3-5): tibia 0.922 / 0.925, +0.021 / +0.021;
  humerus 0.947 / 0.934, +0.004 / +0.021. Each calls 0.79-0.96 of its cohort's UNIT
  translations lesion against 0.08-0.13 of the healthy patches untouched.
Three cost 3x the training (about 40 s -> 120 s for the two fits on 2 cores)."""


def train_phantom_critic(pairs: PairSet, config: CriticConfig, *,
                         members: int = MEMBERS) -> tuple[PhantomCritic, float]:
    """The critic on all pairs (an ensemble of `members` critics seeded config.seed,
    config.seed + 1, ..., each trained on paired batches), its lesion cut by Youden's J on them;
    and its AUC on a held-out quarter of the pairs, measured with a second ensemble fit on the
    other three quarters (how well it generalises to new phantom lesions). See `MEMBERS`."""
    pos = shrink(torch.from_numpy(pairs.lesion), config.size)
    neg = shrink(torch.from_numpy(pairs.healthy), config.size)
    held = max(2, len(pos) // 4)

    def ensemble(p: torch.Tensor, n: torch.Tensor) -> CriticEnsemble:
        return CriticEnsemble([
            _fit_critic(p, n, dataclasses.replace(config, seed=config.seed + k), paired=True)[0]
            for k in range(members)]).eval()

    probe = ensemble(pos[held:], neg[held:])
    p = lesion_probability(probe, np.concatenate([pos[:held], neg[:held]]))
    heldout = roc_auc(np.r_[np.ones(held), np.zeros(held)], p)
    model = ensemble(pos, neg)
    cut = youden_threshold(lesion_probability(model, pos.numpy()),
                           lesion_probability(model, neg.numpy()))
    return PhantomCritic(model, cut), heldout


MAX_BLUR = 2.0
"""The blur (critic pixels) of the phantom critic's training degradations. Measured on the
tibia cohort of a local `make demo` (4000 pairs, 2000 steps, the demo's UNIT as the texture
painter), max_blur 1 -> 2 -> 3: real-patch AUC 0.895 -> 0.905 -> 0.899; lesion-call rise under a
2 px blur of healthy patches +0.105 -> +0.046 -> +0.018; under the UNIT's translations +0.319
-> +0.235 -> +0.368. Two other training degradations were tried and dropped: a smooth random
intensity field (0.05-0.2) left the UNIT's rise at +0.26-0.28; correlated noise (0.03-0.1)
brought it to +0.05-0.10 but made the critic call white noise lesion (+0.14 to +0.44) and cost
real-patch AUC (0.90 -> 0.84-0.87)."""


# ------------------------------------------------------------------------------ validation

Perturbation = Callable[[torch.Tensor], torch.Tensor]


def perturbations() -> dict[str, Perturbation]:
    """Label-free changes a translator might make to a healthy patch: blur, noise, brightness
    and contrast shifts. None of them adds a lesion; a critic worth trusting must not call
    them lesion more often than the untouched patches."""
    gen = torch.Generator().manual_seed(0)

    def noise(sd: float) -> Perturbation:
        return lambda x: (x + sd * torch.randn(x.shape, generator=gen)).clamp(0, 1)

    def blur(sigma: float) -> Perturbation:
        return lambda x: gaussian_blur(x, torch.full((len(x),), sigma))

    def contrast(k: float) -> Perturbation:
        return lambda x: ((x - x.mean((-2, -1), keepdim=True)) * k
                          + x.mean((-2, -1), keepdim=True)).clamp(0, 1)

    return {"blur 1 px": blur(1.0), "blur 2 px": blur(2.0), "noise 0.02": noise(0.02),
            "noise 0.05": noise(0.05), "brightness +0.1": lambda x: (x + 0.1).clamp(0, 1),
            "brightness -0.1": lambda x: (x - 0.1).clamp(0, 1), "contrast x0.8": contrast(0.8),
            "contrast x1.2": contrast(1.2)}


@dataclass(frozen=True)
class CriticValidation:
    """How far to trust the critic, measured on the cohort's own patches."""

    heldout_pair_auc: float  # new phantom pairs
    real_auc: float  # the cohort's real lesion patches against its normal patches
    healthy_rate: float  # lesion calls on untouched healthy patches
    perturbed_rates: dict[str, float]  # ... after each perturbation
    translated_rates: dict[str, float]  # ... after each named translator

    @property
    def worst_rise(self) -> float:
        """The largest rise in lesion calls that a label-free perturbation causes: the critic's
        false-alarm check. Translators are not in it: whether their rise is a false alarm
        depends on the translator (a texture painter's is, a lesion painter's is the point)."""
        return max((r - self.healthy_rate for r in self.perturbed_rates.values()), default=0.0)


def validate(critic: PhantomCritic, *, heldout_pair_auc: float, lesion: np.ndarray,
             normal: np.ndarray,
             translators: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None
             ) -> CriticValidation:
    """The critic's AUC on real lesion vs normal patches, and its lesion-call rates on the normal
    patches untouched, perturbed (`perturbations`) and translated by each of `translators`."""
    p = np.r_[lesion_probability(critic.model, lesion), lesion_probability(critic.model, normal)]
    real_auc = roc_auc(np.r_[np.ones(len(lesion)), np.zeros(len(normal))], p)
    healthy = torch.from_numpy(np.ascontiguousarray(normal, np.float32))
    perturbed = {name: critic.lesion_rate(f(healthy).numpy())
                 for name, f in perturbations().items()}
    translated = {name: critic.lesion_rate(t(normal)) for name, t in (translators or {}).items()}
    return CriticValidation(heldout_pair_auc=heldout_pair_auc, real_auc=real_auc,
                            healthy_rate=critic.lesion_rate(normal), perturbed_rates=perturbed,
                            translated_rates=translated)


def markdown(v: CriticValidation, body_part: str) -> str:
    """The validation as a report section."""
    lines = [f"### Phantom lesion critic, {body_part}", "",
             f"Held-out AUC on new phantom pairs: {v.heldout_pair_auc:.3f}; on the cohort's real "
             f"lesion patches against its normal patches: **{v.real_auc:.3f}**.", "",
             "| healthy patches | called lesion | rise |", "|---|---|---|",
             f"| untouched | {v.healthy_rate:.3f} | – |"]
    for name, rate in (*v.perturbed_rates.items(), *v.translated_rates.items()):
        lines.append(f"| {name} | {rate:.3f} | {rate - v.healthy_rate:+.3f} |")
    return "\n".join(lines) + "\n"


__all__ = ["MAX_BLUR", "MEMBERS", "CriticValidation", "PairSet", "PhantomCritic", "markdown",
           "paired_patches", "perturbations", "train_phantom_critic", "validate"]
