"""Synthetic translation patches and seeded smoke-size networks for the UNIT tests (not
library code).

A patch is a bright vertical bar (bone) on a dim background with Gaussian noise; a lesion patch
has a dark ellipse inside the bar. Deterministic for a given numpy Generator.
"""

from __future__ import annotations

import numpy as np
import torch

from boneaug.config import load_config
from boneaug.data.arrays import encode_pixels
from boneaug.models.unit import UNIT, Discriminators, UnitArch

SMOKE = load_config("smoke").unit
ARCH = UnitArch.from_config(SMOKE)


def bone_patch(rng: np.random.Generator, size: int, *, lesion: bool) -> np.ndarray:
    """(size, size) float32 in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    half = size * rng.uniform(0.18, 0.26)
    img = 0.15 + rng.uniform(0.5, 0.7) * (np.abs(xx - cx) < half)
    if lesion:
        cy = size * rng.uniform(0.35, 0.65)
        ry, rx = size * rng.uniform(0.12, 0.2), half * rng.uniform(0.5, 0.8)
        img = img - 0.4 * ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1)
    img = img + rng.normal(0, 0.03, size=img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def patches(n: int, size: int, *, lesion: bool, seed: int) -> np.ndarray:
    """(n, 1, size, size) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.stack([bone_patch(rng, size, lesion=lesion)[None] for _ in range(n)])


def patch_rows(arr: np.ndarray, kind: str) -> list[dict]:
    """Patch-set rows (CONTRACTS.md columns that UNIT reads, plus ids)."""
    return [{"patch_id": f"{kind}-{i:04d}", "kind": kind, "height": a.shape[-2],
             "width": a.shape[-1], "pixels": encode_pixels(a[0])} for i, a in enumerate(arr)]


def nets(seed: int = 0) -> tuple[UNIT, Discriminators]:
    """The smoke profile's UNIT and discriminators, initialised from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return UNIT(ARCH, generator=g), Discriminators(ARCH, generator=g)
