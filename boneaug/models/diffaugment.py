"""Differentiable augmentation of the discriminators' inputs (DiffAugment: Zhao et al.,
NeurIPS 2020, "Differentiable Augmentation for Data-Efficient GAN Training";
mit-han-lab/data-efficient-gans).

A discriminator trained on ~100 lesion patches memorises them. DiffAugment applies the same
random policy to real and generated images every time D sees them, in D's step and in G's step,
and every op is differentiable in the image, so G's gradient flows through it. Images are in
[-1, 1], as the UNIT trainer feeds D; the magnitudes at strength 1 are the reference's:

- brightness: add U(-0.5, 0.5) x strength per image;
- contrast: scale about the image mean by 1 + U(-0.5, 0.5) x strength;
- translation: shift by up to 1/8 x strength of each side (whole pixels), filling with 0;
- cutout: set a square of 1/2 x strength of each side, at a random centre, to 0.

Strength 0, or no ops, is the identity. `paired=True` gives the two halves of a batch the same
draws (sample i and sample i + B/2), for callers that stack fakes and reals in one call and want
each pair transformed alike. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Op = Literal["brightness", "contrast", "translation", "cutout"]
OPS: tuple[Op, ...] = get_args(Op)
FILL = 0.0  # mid-grey in [-1, 1], as the reference
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


@dataclass(frozen=True)
class DiffAugment:
    """A differentiable augmentation policy: `ops` applied in the order given, at `strength`."""

    ops: tuple[Op, ...] = ()
    strength: float = 1.0
    paired: bool = False

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"unknown DiffAugment ops {unknown}; choose from {', '.join(OPS)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"DiffAugment strength must be in [0, 1], got {self.strength}")

    @property
    def active(self) -> bool:
        return bool(self.ops) and self.strength > 0

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W) -> the same shape, augmented per image (per pair when `paired`)."""
        if not self.active:
            return x
        if self.paired and len(x) % 2:
            raise ValueError(f"paired DiffAugment needs an even batch, got {len(x)}")
        draws = len(x) // 2 if self.paired else len(x)
        for op in self.ops:
            x = _OPS[op](x, self.strength, _Draw(draws, self.paired, x.device, generator))
        return x


@dataclass(frozen=True)
class _Draw:
    """Random numbers for one op: `count` draws, repeated for both halves when paired."""

    count: int
    paired: bool
    device: torch.device
    generator: torch.Generator | None

    def uniform(self) -> Tensor:  # (B,) in [0, 1)
        u = torch.rand(self.count, device=self.device, generator=self.generator)
        return u.repeat(2) if self.paired else u

    def integers(self, low: int, high: int) -> Tensor:  # (B,) in [low, high)
        i = torch.randint(low, high, (self.count,), device=self.device, generator=self.generator)
        return i.repeat(2) if self.paired else i


def _brightness(x: Tensor, strength: float, draw: _Draw) -> Tensor:
    shift = (draw.uniform() - 0.5) * strength
    return x + shift.to(x.dtype).view(-1, 1, 1, 1)


def _contrast(x: Tensor, strength: float, draw: _Draw) -> Tensor:
    factor = 1.0 + (draw.uniform() - 0.5) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.to(x.dtype).view(-1, 1, 1, 1) + mean


def _translation(x: Tensor, strength: float, draw: _Draw) -> Tensor:
    b, _, h, w = x.shape
    sy, sx = round(h * TRANSLATION_RATIO * strength), round(w * TRANSLATION_RATIO * strength)
    if sy == 0 and sx == 0:
        return x
    dy = draw.integers(-sy, sy + 1).view(b, 1, 1)
    dx = draw.integers(-sx, sx + 1).view(b, 1, 1)
    padded = F.pad(x, (sx, sx, sy, sy), value=FILL)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + sy + dy  # (B, H, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + sx + dx  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: Tensor, strength: float, draw: _Draw) -> Tensor:
    b, _, h, w = x.shape
    ch, cw = round(h * CUTOUT_RATIO * strength), round(w * CUTOUT_RATIO * strength)
    if ch == 0 or cw == 0:
        return x
    top = (draw.integers(0, h) - ch // 2).view(b, 1, 1)
    left = (draw.integers(0, w) - cw // 2).view(b, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (B, H, W)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, FILL), x)


_OPS = {"brightness": _brightness, "contrast": _contrast, "translation": _translation,
        "cutout": _cutout}

__all__ = ["OPS", "DiffAugment", "Op"]
