"""DiffAugment: differentiable, identity at strength 0, pairs alike, and in both UNIT steps;
the discriminators' real-vs-translated AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from unit_helpers import SMOKE, nets, patches

from boneaug.config import load_config
from boneaug.errors import ConfigError
from boneaug.models.diffaugment import OPS, DiffAugment
from boneaug.train.unit import (
    LossWeights,
    d_step,
    disc_augment,
    discriminator_aucs,
    g_step,
    generate,
    make_optimizers,
)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", [DiffAugment(), DiffAugment(OPS, strength=0.0)],
                         ids=["no-ops", "strength-0"])
def test_an_inactive_policy_is_the_identity(policy: DiffAugment) -> None:
    x = _images()
    assert not policy.active
    assert policy(x, _gen()) is x


@pytest.mark.parametrize("op", OPS)
def test_each_op_changes_the_images_and_lets_gradients_through(op: str) -> None:
    x = _images().requires_grad_(True)
    y = DiffAugment((op,))(x, _gen(3))  # type: ignore[arg-type]
    assert y.shape == x.shape and not torch.allclose(y, x)
    (y * torch.linspace(0, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ops_do_what_they_say() -> None:
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 16, 16] = 1.0  # one bright pixel in the middle
    moved = DiffAugment(("translation",))(x, _gen(1))
    where = [torch.nonzero(m[0]).tolist() for m in moved]
    shifts = {(r - 16, c - 16) for (r, c), in where}
    assert all(abs(dr) <= 4 and abs(dc) <= 4 for dr, dc in shifts) and len(shifts) > 10
    assert torch.equal(moved.sum((1, 2, 3)), torch.ones(64))  # shifted, not blurred or lost

    ones = torch.ones(256, 1, 32, 32)
    cut = DiffAugment(("cutout",))(ones, _gen(2))
    erased = (cut == 0).float().mean((1, 2, 3))
    assert erased.max() <= 0.25 + 1e-6 and 0.1 < erased.mean() < 0.25  # a 16 x 16 square, clipped
    assert set(cut.unique().tolist()) <= {0.0, 1.0}

    flat = torch.full((256, 1, 8, 8), 0.2)
    bright = DiffAugment(("brightness",))(flat, _gen(4))
    shift = bright[:, 0, 0, 0] - 0.2
    assert shift.abs().max() <= 0.5 and shift.std() > 0.2  # U(-0.5, 0.5)
    assert torch.allclose(bright, bright[:, :, :1, :1].expand_as(bright))  # per image, uniform
    half = DiffAugment(("brightness",), strength=0.5)(flat, _gen(4))
    assert torch.allclose(half - 0.2, (bright - 0.2) / 2, atol=1e-6)

    x = _images(128)
    contrast = DiffAugment(("contrast",))(x, _gen(5))
    assert torch.allclose(contrast.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)  # about the mean
    ratio = contrast.std((1, 2, 3)) / x.std((1, 2, 3))
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 1.5 + 1e-4


def test_paired_gives_both_halves_the_same_draws_and_a_seed_the_same_answer() -> None:
    a = _images(4)
    both = torch.cat([a, a])
    paired = DiffAugment(OPS, paired=True)(both, _gen(7))
    assert torch.equal(paired[:4], paired[4:])
    unpaired = DiffAugment(OPS)(both, _gen(7))
    assert not torch.equal(unpaired[:4], unpaired[4:])
    assert torch.equal(DiffAugment(OPS)(both, _gen(7)), unpaired)
    with pytest.raises(ValueError, match="even batch"):
        DiffAugment(OPS, paired=True)(a[:3], _gen())


def test_bad_policies_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="choose from brightness"):
        DiffAugment(("blur",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DiffAugment(("cutout",), strength=1.5)
    with pytest.raises(ConfigError, match="disc_augment"):
        load_config("smoke", overrides={"unit": {"disc_augment": ["blur"]}})


def test_d_sees_every_batch_through_the_policy_in_both_steps() -> None:
    unit, dis = nets()
    weights = LossWeights.from_config(SMOKE)
    optimizers = make_optimizers(unit, dis, SMOKE)
    x_h, x_l = _images(4, seed=1), _images(4, seed=2)
    seen: list[tuple[int, bool]] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen.append((len(x), x.requires_grad))
        return x.flip(-1)

    out = generate(unit, x_h, x_l, weights=weights, generator=_gen())
    d_step(dis, out, x_h, x_l, weights=weights, optimizer=optimizers.d, augment=augment)
    assert seen == [(8, False), (8, False)]  # [fake; real] per domain, fakes detached
    g_step(dis, out, x_h, x_l, weights=weights, optimizer=optimizers.g, augment=augment)
    assert seen[2:] == [(4, True), (4, True)]  # the translations, with G's graph


def test_the_configured_policy_is_seeded_and_off_draws_nothing() -> None:
    on = SMOKE.model_copy(update={"disc_augment": ("translation", "cutout")})
    a, b = disc_augment(on, torch.device("cpu"), 5), disc_augment(on, torch.device("cpu"), 5)
    assert a is not None and b is not None
    x = _images()
    first = a(x)
    assert torch.equal(first, b(x)) and not torch.equal(first, a(x))  # seeded, then moving on
    assert disc_augment(SMOKE, torch.device("cpu"), 5) is None


def test_discriminator_aucs_are_one_half_for_a_constant_d() -> None:
    unit, dis = nets(seed=3)
    lesion = patches(12, 32, lesion=True, seed=0)
    normal = patches(12, 32, lesion=False, seed=1)
    source = patches(12, 32, lesion=False, seed=2)
    aucs = discriminator_aucs(unit, dis, lesion=lesion, normal=normal, source=source)
    assert set(aucs) == {"d/auc_l", "d/auc_h"} and all(0 <= v <= 1 for v in aucs.values())
    assert dis.training  # mode restored
    with torch.no_grad():
        for net in (dis.dis_h, dis.dis_l):
            for scale in net.nets:
                scale[-1].weight.zero_()
                scale[-1].bias.fill_(0.3)
    constant = discriminator_aucs(unit, dis, lesion=lesion, normal=normal, source=source)
    assert constant == {"d/auc_l": 0.5, "d/auc_h": 0.5}
    assert np.isfinite(list(aucs.values())).all()
