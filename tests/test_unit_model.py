"""UNIT networks: weight sharing, shapes, reference sizes, exact fast paths, initialisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from boneaug.config import load_config
from boneaug.models.unit import (
    UNIT,
    Discriminators,
    ForwardPlan,
    Translator,
    UnitArch,
    UpConv,
    count_parameters,
    upsample_conv5,
)

TINY = UnitArch(width=8, n_res=2, n_shared=1, disc_width=8, disc_layers=3, disc_scales=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize("n_shared", [1, 2])
def test_shared_blocks_are_the_same_parameter_objects(n_shared: int) -> None:
    unit = UNIT(UnitArch(width=4, n_res=2, n_shared=n_shared))
    assert len(unit.enc_h.shared) == len(unit.gen_h.shared) == n_shared
    for a, b in zip(unit.enc_h.shared.parameters(), unit.enc_l.shared.parameters(), strict=True):
        assert a is b
    for a, b in zip(unit.gen_h.shared.parameters(), unit.gen_l.shared.parameters(), strict=True):
        assert a is b
    # exactly the shared blocks are common to the two VAEs; the rest is each domain's own
    vae_h, vae_l = _ids(unit.enc_h) | _ids(unit.gen_h), _ids(unit.enc_l) | _ids(unit.gen_l)
    assert vae_h & vae_l == _ids(unit.enc_h.shared) | _ids(unit.gen_h.shared)
    assert not _ids(unit.enc_h.front) & _ids(unit.enc_l.front)
    assert not _ids(unit.gen_h.back) & _ids(unit.gen_l.back)
    # the encoder tail and the decoder head are different blocks (not tied to each other)
    assert not _ids(unit.enc_h.shared) & _ids(unit.gen_h.shared)
    # the optimiser sees a shared parameter once
    params = list(unit.parameters())
    assert len(params) == len({id(p) for p in params})
    assert count_parameters(unit) == sum(p.numel() for p in params)


def test_nothing_is_shared_with_n_shared_zero() -> None:
    unit = UNIT(UnitArch(width=4, n_res=2, n_shared=0))
    assert not (_ids(unit.enc_h) | _ids(unit.gen_h)) & (_ids(unit.enc_l) | _ids(unit.gen_l))
    assert len(unit.enc_h.front) == 1 + 2 + 2  # stem, two downsamplers, two own res blocks


def test_shared_weights_stay_shared_through_a_state_dict_round_trip() -> None:
    a, b = UNIT(TINY, generator=torch.Generator().manual_seed(1)), UNIT(TINY)
    b.load_state_dict(a.state_dict())
    assert all(x is y for x, y in zip(b.enc_h.shared.parameters(), b.enc_l.shared.parameters(),
                                      strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_paper_architecture_has_the_reference_parameter_counts() -> None:
    arch = UnitArch.from_config(load_config("paper").unit)
    assert arch == UnitArch()  # width 64, 1 channel, 2 downsamples, 4 res blocks, 3 x 4-layer D
    unit, dis = UNIT(arch), Discriminators(arch)
    for enc, gen in ((unit.enc_h, unit.gen_h), (unit.enc_l, unit.gen_l)):
        assert count_parameters(enc, gen) == pytest.approx(11.13e6, rel=0.01)
    assert count_parameters(dis.dis_h) == pytest.approx(8.27e6, rel=0.01)
    assert count_parameters(dis.dis_l) == count_parameters(dis.dis_h)
    # one shared block each side: 2 x 1.18 M counted once in the pair
    assert count_parameters(unit) == 2 * 11_127_937 - 2 * 1_180_160


def test_shapes_of_every_output() -> None:
    unit, dis = UNIT(TINY), Discriminators(TINY)
    x_h, x_l = torch.rand(3, 1, 32, 48) * 2 - 1, torch.rand(3, 1, 32, 48) * 2 - 1
    out = unit(x_h, x_l)
    latent = (3, TINY.latent_channels, 8, 12)  # 8 * 2**2 channels at H/4 x W/4
    assert out.mu_h.shape == out.mu_l.shape == out.mu_hl.shape == out.mu_lh.shape == latent
    for x in (out.x_hh, out.x_ll, out.x_hl, out.x_lh, out.x_hlh, out.x_lhl):
        assert x.shape == (3, 1, 32, 48) and x.abs().max() <= 1
    scores_h, scores_l = dis(x_h, x_l)
    # 3 stride-2 layers per scale
    assert [s.shape for s in scores_h] == [(3, 1, 4, 6), (3, 1, 2, 3)]
    assert len(scores_l) == TINY.disc_scales


def test_forward_plan_computes_only_what_is_asked() -> None:
    unit = UNIT(TINY)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    plan = ForwardPlan(recon=False, cross=True, cycle_encode=True, cycle_decode=False)
    out = unit(x, x, plan=plan)
    assert out.x_hh is None and out.x_ll is None and out.x_hlh is None and out.x_lhl is None
    assert out.x_hl is not None and out.mu_hl is not None
    only_latent = unit(x, x, plan=ForwardPlan(recon=False, cross=False, cycle_encode=False,
                                             cycle_decode=False))
    assert only_latent.x_hl is None and only_latent.mu_h.shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="cycle_decode needs cycle_encode"):
        ForwardPlan(cycle_encode=False, cycle_decode=True)


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_batched_training_forward_equals_separate_network_calls(n_shared: int) -> None:
    """The forward batches the shared blocks and each decoder's latents; without noise it is
    exactly E/G applied one by one."""
    arch = UnitArch(width=4, n_res=2, n_shared=n_shared, disc_width=4)
    unit = UNIT(arch, generator=torch.Generator().manual_seed(0))
    x_h, x_l = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 16, 16) * 2 - 1
    out = unit(x_h, x_l, noise=False)
    mu_h, mu_l = unit.enc_h(x_h), unit.enc_l(x_l)
    x_hl, x_lh = unit.gen_l(mu_h), unit.gen_h(mu_l)
    expected = {
        "mu_h": mu_h, "mu_l": mu_l, "x_hh": unit.gen_h(mu_h), "x_ll": unit.gen_l(mu_l),
        "x_hl": x_hl, "x_lh": x_lh, "mu_hl": unit.enc_l(x_hl), "mu_lh": unit.enc_h(x_lh),
        "x_hlh": unit.gen_h(unit.enc_l(x_hl)), "x_lhl": unit.gen_l(unit.enc_h(x_lh)),
    }
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name), value, rtol=1e-4, atol=1e-5, msg=name)


def test_training_noise_is_unit_gaussian_and_seeded() -> None:
    unit = UNIT(TINY)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a = unit(x, x, generator=torch.Generator().manual_seed(3))
        b = unit(x, x, generator=torch.Generator().manual_seed(3))
        clean = unit(x, x, noise=False)
    assert torch.equal(a.x_hl, b.x_hl)
    assert not torch.allclose(a.x_hl, clean.x_hl)
    assert torch.equal(a.mu_h, clean.mu_h)  # noise is added after the encoder, not inside it


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (1, 3, 2, 2), (3, 4, 16, 16)])
def test_low_resolution_upsample_conv_equals_the_direct_form(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, shape[1], 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    direct = F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (2,) * 4,
                            mode="reflect"), w, b)
    fast = upsample_conv5(x, w, b)
    torch.testing.assert_close(fast, direct, rtol=1e-10, atol=1e-10)
    grad = torch.randn(direct.shape, dtype=torch.float64, generator=g)
    for a, c in zip(torch.autograd.grad(fast, (x, w, b), grad),
                    torch.autograd.grad(direct, (x, w, b), grad), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_upconv_module_matches_its_reference_forward() -> None:
    torch.manual_seed(0)
    module = UpConv(16, 8)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(module(x), module.reference_forward(x), rtol=1e-4, atol=1e-5)
    assert [n for n, _ in module.named_parameters()] == ["conv.weight", "conv.bias", "norm.weight",
                                                          "norm.bias"]


def test_translator_maps_unit_interval_deterministically_and_checks_sizes() -> None:
    unit = UNIT(TINY, generator=torch.Generator().manual_seed(0))
    translator = unit.translator("h2l")
    assert isinstance(translator, Translator)
    assert translator.encoder is unit.enc_h and translator.decoder is unit.gen_l
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        y1, y2 = translator(x), translator(x)
        direct = (unit.gen_l(unit.enc_h(x * 2 - 1)) + 1) / 2
    assert torch.equal(y1, y2) and y1.min() >= 0 and y1.max() <= 1
    torch.testing.assert_close(y1, direct)
    with pytest.raises(ValueError, match="multiples of 4"):
        translator(torch.rand(1, 1, 30, 32))
    for direction, (enc, gen) in {"l2h": (unit.enc_l, unit.gen_h), "h2h": (unit.enc_h, unit.gen_h),
                                  "l2l": (unit.enc_l, unit.gen_l)}.items():
        t = unit.translator(direction)
        assert t.encoder is enc and t.decoder is gen
    for bad in ("sideways", "h2", "2l", "h2x"):
        with pytest.raises(ValueError, match="h2l"):
            unit.translator(bad)


def test_a_translator_that_keeps_exposure_gives_its_input_mean_and_sd_and_the_same_pattern(
) -> None:
    kept = dataclasses.replace(TINY, keep_exposure=True)
    free = UNIT(TINY, generator=torch.Generator().manual_seed(0)).translator("h2l")
    unit = UNIT(kept, generator=torch.Generator().manual_seed(0))
    translator = unit.translator("h2l")
    x = 0.3 + 0.4 * torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y_free = translator(x), free(x)
    torch.testing.assert_close(y.mean((-2, -1)), x.mean((-2, -1)))
    torch.testing.assert_close(y.std((-2, -1)), x.std((-2, -1)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y_free.mean((-2, -1)), x.mean((-2, -1)), atol=1e-3)
    # the same weights draw the same pattern: the two differ by a gain and offset per image
    for a, b in zip(y, y_free, strict=True):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9999
    assert translator.spec["arch"]["keep_exposure"] is True  # the registry rebuilds it


def test_initialisation_follows_the_reference_and_is_seeded() -> None:
    arch = UnitArch(width=16, n_res=2, disc_width=16)
    a = UNIT(arch, generator=torch.Generator().manual_seed(5))
    b = UNIT(arch, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    conv = a.enc_h.shared[0].conv1  # 3x3, 64 -> 64: Kaiming std sqrt(2 / fan_in)
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    dis = Discriminators(arch, generator=torch.Generator().manual_seed(5))
    weight = dis.dis_h.nets[0][2].weight  # second conv of the finest scale
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_invalid_architecture_names_the_bad_fields() -> None:
    with pytest.raises(ValueError, match="n_shared"):
        UnitArch(n_res=1, n_shared=2)
    with pytest.raises(ValueError, match="disc_scales"):
        UnitArch(disc_scales=0)


def test_a_standardised_discriminator_ignores_gain_and_offset_and_passes_gradients() -> None:
    """disc_standardize: D scores the patch's pattern, not its exposure, and G still gets a
    gradient through the standardisation."""
    from boneaug.models.unit import MsImageDis

    arch = UnitArch(width=8, disc_width=8, disc_layers=2, disc_scales=2, disc_standardize=True)
    d = MsImageDis(arch)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for a, b in zip(d(x), d(1.7 * x - 0.4), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    sum(o.sum() for o in d(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    plain = MsImageDis(UnitArch(width=8, disc_width=8, disc_layers=2, disc_scales=2))
    plain.load_state_dict(d.state_dict())
    assert not torch.allclose(plain(x)[0], plain(1.7 * x - 0.4)[0], atol=1e-3)


def test_disc_lr_sets_the_discriminators_learning_rate_only() -> None:
    from boneaug.models.unit import Discriminators
    from boneaug.train.unit import make_optimizers

    config = load_config("smoke").unit.model_copy(update={"disc_lr": 1e-3})
    arch = UnitArch.from_config(config)
    optimizers = make_optimizers(UNIT(arch), Discriminators(arch), config)
    assert optimizers.d.param_groups[0]["lr"] == 1e-3
    assert optimizers.g.param_groups[0]["lr"] == config.lr
    same = make_optimizers(UNIT(arch), Discriminators(arch), load_config("smoke").unit)
    assert same.d.param_groups[0]["lr"] == config.lr  # None: as published, D at G's lr
