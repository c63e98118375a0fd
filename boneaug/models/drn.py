"""Dilated Residual Networks (Yu, Koltun, Funkhouser, CVPR 2017), one input channel for X-ray.

Same layout and parameter names as the public reference (fyu/drn, ``drn.py``), so its
state dicts line up key for key:

    stem     C: ``conv1``/``bn1`` (7x7, stride 1)      D: ``layer0`` (7x7 conv, BN, ReLU)
    stage 1  ``layer1``  16 ch, stride 1                C: basic blocks   D: 3x3 conv layers
    stage 2  ``layer2``  32 ch, stride 2                C: basic blocks   D: 3x3 conv layers
    stage 3  ``layer3``  64 ch, stride 2                residual blocks (basic or bottleneck)
    stage 4  ``layer4`` 128 ch, stride 2                residual blocks         -> output stride 8
    stage 5  ``layer5`` 256 ch, dilation 2              residual blocks
    stage 6  ``layer6`` 512 ch, dilation 4              residual blocks
    stage 7  ``layer7`` 512 ch, dilation 2, no residual C: basic blocks   D: conv layers
    stage 8  ``layer8`` 512 ch, dilation 1, no residual C: basic blocks   D: conv layers
    head     global adaptive average pool, 1x1 conv ``fc`` to the classes

Differences from the reference, on purpose: the pool is adaptive (a 1024x512 radiograph leaves a
128x64 map, not the 28x28 of ImageNet crops); `in_channels` and `width_mult` are arguments; the
``fc`` bias starts at 0; a non-residual block gets no (unused) projection shortcut.

Downsampling (`downsample`): the reference halves the resolution in stages 2-4 with stride-2
convolutions ("stride"). "maxpool" takes the same three halvings with a 2x2 max-pool in front of
those stages instead (their convolutions then have stride 1; same parameters, about the same
FLOPs). Small, thin findings (a fracture line, a lesion a few pixels wide at 256x128) survive a
max-pool but are sampled away by a strided convolution: on the local fracture corpus a
drn_d_22 at width 0.25 reached validation AUC 0.93 after 5 epochs with max-pools and 0.64 with
strides (a plain 5-layer CNN: 0.88 with max-pools, 0.60 with strides).

The head's 1x1 conv starts at N(0, 0.01): the reference's fan-out rule gives std sqrt(2) for one
output class, which starts training with saturated logits.

Fine-tuning ("fine-tune the last two convolutional blocks and the fully-connected layer", Gupta
et al. 2019): a *block* here is one of the eight stages above (the stem counts with stage 1).
`DRN.freeze(trainable_stages=2)` leaves stages 7 and 8 and the head trainable; frozen stages also
keep their BatchNorm layers in eval mode, so their running statistics stay those of pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHS",
    "CHANNELS",
    "DRN",
    "BasicBlock",
    "Bottleneck",
    "build_drn",
    "drn_c_26",
    "drn_d_22",
    "drn_d_38",
    "drn_d_54",
]

CHANNELS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 512, 512)
MIN_CHANNELS = 4
NUM_STAGES = 8
POOLED_STAGES = (2, 3, 4)  # the stages that halve the resolution
Arch = Literal["C", "D"]
Downsample = Literal["stride", "maxpool"]


def scaled_channels(width_mult: float, base: Sequence[int] = CHANNELS) -> tuple[int, ...]:
    """`base` times `width_mult`, rounded, at least MIN_CHANNELS each."""
    return tuple(max(MIN_CHANNELS, int(round(c * width_mult))) for c in base)


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution that keeps the size (stride 1) whatever the dilation."""
    return nn.Conv2d(
        in_ch, out_ch, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; identity (or 1x1 projection) shortcut unless `residual` is False."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand x4; shortcut unless `residual` is False."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, 4*planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


class DRN(nn.Module):
    """A DRN-C or DRN-D classifier returning logits (B, num_classes); output stride 8."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        arch: Arch,
        num_classes: int = 1,
        in_channels: int = 1,
        width_mult: float = 1.0,
        downsample: Downsample = "stride",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"downsample must be 'stride' or 'maxpool', got {downsample!r}")
        self.downsample = downsample
        step = 2 if downsample == "stride" else 1
        _check_args(layers, arch=arch, num_classes=num_classes, in_channels=in_channels,
                    width_mult=width_mult)
        ch = scaled_channels(width_mult)
        self.arch: Arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self._in = ch[0]

        if arch == "C":
            self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=7, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(ch[0])
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = self._residual_stage(BasicBlock, ch[0], layers[0])
            self.layer2 = self._residual_stage(BasicBlock, ch[1], layers[1], stride=step)
        else:
            self.layer0 = nn.Sequential(
                nn.Conv2d(in_channels, ch[0], kernel_size=7, padding=3, bias=False),
                nn.BatchNorm2d(ch[0]),
                nn.ReLU(inplace=True),
            )
            self.layer1 = self._conv_stage(ch[0], layers[0])
            self.layer2 = self._conv_stage(ch[1], layers[1], stride=step)
        self.layer3 = self._residual_stage(block, ch[2], layers[2], stride=step)
        self.layer4 = self._residual_stage(block, ch[3], layers[3], stride=step)
        self.layer5 = self._residual_stage(block, ch[4], layers[4], dilation=2)
        self.layer6 = (self._residual_stage(block, ch[5], layers[5], dilation=4)
                       if layers[5] else None)
        if arch == "C":
            self.layer7 = (self._residual_stage(BasicBlock, ch[6], layers[6], dilation=2,
                                                residual=False) if layers[6] else None)
            self.layer8 = (self._residual_stage(BasicBlock, ch[7], layers[7], dilation=1,
                                                residual=False) if layers[7] else None)
        else:
            self.layer7 = self._conv_stage(ch[6], layers[6], dilation=2) if layers[6] else None
            self.layer8 = self._conv_stage(ch[7], layers[7], dilation=1) if layers[7] else None
        self.out_channels = self._in
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(self.out_channels, num_classes, kernel_size=1, bias=True)
        self.trainable_stages: int = NUM_STAGES
        self.reset_parameters(generator)
        # NHWC: 1.4x the fp32 training step and 1.5x inference of NCHW on this CPU (AVX-512,
        # benchmarks/bench_drn.py), and what cuDNN prefers; load_state_dict keeps the layout
        self.to(memory_format=torch.channels_last)

    # ---- construction -------------------------------------------------------------------
    def _residual_stage(
        self,
        block: Block,
        planes: int,
        blocks: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        residual: bool = True,
    ) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if residual and (stride != 1 or self._in != out_ch):
            downsample = nn.Sequential(
                nn.Conv2d(self._in, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        mods: list[nn.Module] = [
            block(self._in, planes, stride=stride, dilation=dilation, downsample=downsample,
                  residual=residual)
        ]
        self._in = out_ch
        mods += [block(out_ch, planes, dilation=dilation, residual=residual)
                 for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _conv_stage(
        self, channels: int, convs: int, *, stride: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        mods: list[nn.Module] = []
        for i in range(convs):
            mods += [
                conv3x3(self._in, channels, stride=stride if i == 0 else 1, dilation=dilation),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            self._in = channels
        return nn.Sequential(*mods)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal (fan-out) convs as in the reference, BN = identity, fc N(0, 0.01), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / n), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.fc.weight.normal_(0.0, 0.01, generator=generator)

    # ---- stages and freezing ------------------------------------------------------------
    def stem(self) -> list[nn.Module]:
        return [self.conv1, self.bn1] if self.arch == "C" else [self.layer0]

    def stages(self) -> list[nn.Module]:
        """Stages 1..8 that exist (stages 6-8 may be absent in custom layer counts)."""
        names = [f"layer{i}" for i in range(1, NUM_STAGES + 1)]
        return [m for m in (getattr(self, n) for n in names) if m is not None]

    def frozen_modules(self) -> list[nn.Module]:
        stages = self.stages()
        n_frozen = max(0, len(stages) - self.trainable_stages)
        return (self.stem() if n_frozen else []) + stages[:n_frozen]

    def freeze(self, trainable_stages: int) -> DRN:
        """Train only the last `trainable_stages` stages and the head; freeze the rest.

        0 leaves just the head; >= 8 unfreezes everything (the stem belongs to stage 1).
        Frozen BatchNorm layers stay in eval mode whatever `.train()` says.
        """
        if trainable_stages < 0:
            raise ValueError(f"trainable_stages must be >= 0, got {trainable_stages}")
        self.trainable_stages = trainable_stages
        for p in self.parameters():
            p.requires_grad_(True)
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> DRN:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    # ---- forward -------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/8, W/8)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DRN expects (B, {self.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        if self.arch == "C":
            x = self.relu(self.bn1(self.conv1(x)))
        else:
            x = self.layer0(x)
        pool = self.downsample == "maxpool"
        for index, stage in enumerate(self.stages(), start=1):
            if pool and index in POOLED_STAGES:
                x = nn.functional.max_pool2d(x, 2, ceil_mode=True)
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, num_classes) logits
        x = self.avgpool(self.features(x))  # (B, C_out, 1, 1)
        return self.fc(x).flatten(1)


def _check_args(
    layers: Sequence[int], *, arch: str, num_classes: int, in_channels: int, width_mult: float
) -> None:
    if arch not in ("C", "D"):
        raise ValueError(f"arch must be 'C' or 'D', got {arch!r}")
    if len(layers) != NUM_STAGES or any(int(n) != n or n < 0 for n in layers):
        raise ValueError(f"layers must be {NUM_STAGES} non-negative ints, got {list(layers)}")
    if min(layers[:5]) < 1:
        raise ValueError(f"stages 1-5 need at least one layer each, got {list(layers)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not (math.isfinite(width_mult) and width_mult > 0):
        raise ValueError(f"width_mult must be a positive finite number, got {width_mult}")


ARCHS: dict[str, tuple[Block, tuple[int, ...], Arch]] = {
    "drn_c_26": (BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1), "C"),
    "drn_d_22": (BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1), "D"),
    "drn_d_38": (BasicBlock, (1, 1, 3, 4, 6, 3, 1, 1), "D"),
    "drn_d_54": (Bottleneck, (1, 1, 3, 4, 6, 3, 1, 1), "D"),
}


def build_drn(
    arch: str,
    *,
    num_classes: int = 1,
    in_channels: int = 1,
    width_mult: float = 1.0,
    downsample: Downsample = "stride",
    generator: torch.Generator | None = None,
) -> DRN:
    """One of `ARCHS` by name (e.g. ``DrnConfig.arch``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown DRN arch {arch!r}; choose one of {', '.join(ARCHS)}")
    block, layers, kind = ARCHS[arch]
    model = DRN(block, layers, arch=kind, num_classes=num_classes, in_channels=in_channels,
                width_mult=width_mult, downsample=downsample, generator=generator)
    # what a registry needs to rebuild it (boneaug.models.specs): weights are stored alone
    model.spec = {"kind": "drn", "arch": arch, "num_classes": num_classes,
                  "in_channels": in_channels, "width_mult": width_mult, "downsample": downsample}
    return model


def drn_c_26(*, num_classes: int = 1, in_channels: int = 1, width_mult: float = 1.0,
             generator: torch.Generator | None = None) -> DRN:
    """DRN-C-26: basic blocks throughout; 21.1 M parameters at full width, 1000 classes, RGB."""
    return build_drn("drn_c_26", num_classes=num_classes, in_channels=in_channels,
                     width_mult=width_mult, generator=generator)


def drn_d_22(*, num_classes: int = 1, in_channels: int = 1, width_mult: float = 1.0,
             generator: torch.Generator | None = None) -> DRN:
    """DRN-D-22: conv stem and conv stages 1-2, 7-8; 16.4 M parameters (1000 classes, RGB)."""
    return build_drn("drn_d_22", num_classes=num_classes, in_channels=in_channels,
                     width_mult=width_mult, generator=generator)


def drn_d_38(*, num_classes: int = 1, in_channels: int = 1, width_mult: float = 1.0,
             generator: torch.Generator | None = None) -> DRN:
    """DRN-D-38: DRN-D with [1, 1, 3, 4, 6, 3, 1, 1] layers."""
    return build_drn("drn_d_38", num_classes=num_classes, in_channels=in_channels,
                     width_mult=width_mult, generator=generator)


def drn_d_54(*, num_classes: int = 1, in_channels: int = 1, width_mult: float = 1.0,
             generator: torch.Generator | None = None) -> DRN:
    """DRN-D-54: DRN-D-38's layout with bottleneck blocks in stages 3-6."""
    return build_drn("drn_d_54", num_classes=num_classes, in_channels=in_channels,
                     width_mult=width_mult, generator=generator)
