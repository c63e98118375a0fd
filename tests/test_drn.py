"""DRN architecture: published sizes, shapes, output stride, dilations, freezing, checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boneaug.models.drn import ARCHS, DRN, build_drn, drn_c_26, drn_d_22, drn_d_38, drn_d_54

# Yu et al. 2017 / fyu/drn README: parameters with 1000 ImageNet classes and RGB input.
PUBLISHED_M = {"drn_d_22": 16.4, "drn_c_26": 21.1, "drn_d_38": 26.5, "drn_d_54": 35.8}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(PUBLISHED_M))
def test_full_width_parameter_count_matches_the_published_one(arch: str) -> None:
    model = build_drn(arch, num_classes=1000, in_channels=3)
    assert _params(model) / 1e6 == pytest.approx(PUBLISHED_M[arch], rel=0.01)


def test_one_channel_one_logit_d22_differs_only_in_stem_and_head() -> None:
    rgb = _params(drn_d_22(num_classes=1000, in_channels=3))
    xray = _params(drn_d_22())
    # stem 7x7: 3 -> 1 input channel (-2*49*16); head 1000 -> 1 logit (-999*(512+1))
    assert rgb - xray == 2 * 49 * 16 + 999 * 513


@pytest.mark.parametrize(("arch", "size", "width"), [
    ("drn_d_22", (256, 128), 0.25),
    ("drn_c_26", (256, 128), 0.25),
    ("drn_d_38", (256, 128), 0.125),
    ("drn_d_54", (256, 128), 0.125),
    ("drn_d_22", (1024, 512), 0.0625),
])
def test_output_stride_8_and_logit_shape(arch: str, size: tuple[int, int], width: float) -> None:
    torch.manual_seed(0)
    model = build_drn(arch, num_classes=3, width_mult=width).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, model.out_channels, size[0] // 8, size[1] // 8)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_dilations_and_residual_flags_follow_the_reference() -> None:
    d = drn_d_22(width_mult=0.125)
    dil = {name: {m.dilation[0] for m in getattr(d, name).modules()
                  if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
           for name in ("layer3", "layer4", "layer5", "layer6", "layer7", "layer8")}
    assert dil == {"layer3": {1}, "layer4": {1}, "layer5": {2}, "layer6": {4}, "layer7": {2},
                   "layer8": {1}}
    # D: stages 1-2 and 7-8 are plain conv/BN/ReLU layers
    assert [type(m) for m in d.layer7] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    c = drn_c_26(width_mult=0.125)
    assert all(not b.residual and b.downsample is None for b in (*c.layer7, *c.layer8))
    assert all(b.residual for b in (*c.layer3, *c.layer6))
    # reference parameter names, so reference state dicts line up key for key
    assert {"conv1.weight", "bn1.running_mean", "layer5.0.downsample.0.weight", "fc.bias"} <= set(
        c.state_dict())
    assert {"layer0.0.weight", "layer1.0.weight", "layer7.0.weight", "layer8.1.running_var"} <= set(
        d.state_dict())


def test_bottleneck_variant_expands_channels_4x() -> None:
    m = drn_d_54(width_mult=0.125)
    assert m.layer6[0].conv3.out_channels == 4 * 64
    assert m.layer7[0].in_channels == 4 * 64 and m.out_channels == 64


def test_same_generator_seed_gives_same_weights() -> None:
    a = drn_d_38(width_mult=0.125, generator=torch.Generator().manual_seed(3))
    b = drn_d_38(width_mult=0.125, generator=torch.Generator().manual_seed(3))
    c = drn_d_38(width_mult=0.125, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y)
               for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.layer3[0].conv1.weight, c.layer3[0].conv1.weight)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(("k", "trainable"), [
    (0, ()),
    (2, ("layer7.", "layer8.")),
    (4, ("layer5.", "layer6.", "layer7.", "layer8.")),
])
def test_freeze_leaves_exactly_the_last_k_stages_and_head_trainable(
    arch: str, k: int, trainable: tuple[str, ...]
) -> None:
    model = build_drn(arch, width_mult=0.125).freeze(k)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith((*trainable, "fc."))}
    assert names == expected and "fc.weight" in names


def test_freeze_all_stages_unfreezes_everything_including_the_stem() -> None:
    model = drn_c_26(width_mult=0.125).freeze(2).freeze(8)
    assert all(p.requires_grad for p in model.parameters())
    assert model.frozen_modules() == []


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode() -> None:
    torch.manual_seed(0)
    model = drn_d_22(width_mult=0.125).freeze(2).train()
    assert not model.layer6.training and not model.layer0.training and model.layer8.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.rand(4, 1, 64, 32))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"layer7", "layer8"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 0}, "num_classes"),
    ({"in_channels": 0}, "in_channels"),
    ({"width_mult": 0.0}, "width_mult"),
    ({"width_mult": float("nan")}, "width_mult"),
])
def test_factories_reject_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drn_d_22(**kwargs)


def test_bad_arch_layers_and_input_are_reported() -> None:
    with pytest.raises(ValueError, match="unknown DRN arch"):
        build_drn("drn_x_1")
    with pytest.raises(ValueError, match="layers"):
        DRN(nn.Module, [1, 1, 1], arch="D")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        drn_d_22(width_mult=0.125)(torch.rand(1, 3, 32, 32))
    with pytest.raises(TypeError):
        drn_d_22(0.5)  # type: ignore[misc]  # keyword-only
    with pytest.raises(ValueError, match="trainable_stages"):
        drn_d_22(width_mult=0.125).freeze(-1)


def test_small_width_keeps_a_channel_floor() -> None:
    model = drn_d_22(width_mult=0.01)
    assert min(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)
               and m is not model.fc) == 4


@pytest.mark.parametrize("arch", ["drn_c_26", "drn_d_22"])
def test_maxpool_downsampling_keeps_parameters_and_output_stride(arch: str) -> None:
    g = torch.Generator().manual_seed(0)
    strided = build_drn(arch, width_mult=0.25, generator=g)
    pooled = build_drn(arch, width_mult=0.25, downsample="maxpool",
                       generator=torch.Generator().manual_seed(0))
    assert [(k, v.shape) for k, v in pooled.state_dict().items()] == [
        (k, v.shape) for k, v in strided.state_dict().items()]  # checkpoints interchange
    assert {m.stride for m in pooled.modules() if isinstance(m, nn.Conv2d)} == {(1, 1)}
    x = torch.rand(2, 1, 250, 126)  # odd halvings round up, as the strided convs do
    with torch.no_grad():
        assert pooled.eval().features(x).shape == strided.eval().features(x).shape
    with pytest.raises(ValueError, match="downsample must be"):
        build_drn(arch, downsample="avg")  # type: ignore[arg-type]


def test_single_logit_head_starts_unsaturated() -> None:
    model = build_drn("drn_d_22", num_classes=1, width_mult=0.25,
                      generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        logits = model(torch.rand(8, 1, 128, 64, generator=torch.Generator().manual_seed(1)))
    assert logits.abs().max() < 1.0  # the fan-out rule (std sqrt(2)) gave logits of several units


def test_built_channels_last_and_a_plain_state_dict_keeps_layout_and_logits() -> None:
    """The DRN is NHWC (faster on CPU and GPU); weights saved from an NCHW copy load into it
    without changing its layout, and both give the same logits."""
    model = build_drn("drn_d_22", width_mult=0.125, downsample="maxpool",
                     generator=torch.Generator().manual_seed(0)).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)

    nchw = build_drn("drn_d_22", width_mult=0.125, downsample="maxpool").eval()
    nchw.load_state_dict(model.state_dict())
    nchw = nchw.to(memory_format=torch.contiguous_format)
    fresh = build_drn("drn_d_22", width_mult=0.125, downsample="maxpool").eval()
    fresh.load_state_dict({k: v.contiguous() for k, v in nchw.state_dict().items()})
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fresh.modules() if isinstance(m, nn.Conv2d))

    x = torch.rand(3, 1, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), nchw(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(x), nchw(x), atol=1e-5, rtol=1e-4)
