"""Alpha-blending of a translated patch back into its radiograph (paper 3.3, SPEC 4).

    x_blend = alpha * x_hl + (1 - alpha) * x_h
    alpha(i, j) = cos(|i|^n * pi/2) * cos(|j|^n * pi/2),  i, j in [-1, 1] across the patch

alpha is 1 at the centre and 0 on the border, so the patch's own contrast or brightness shift
(UNIT's translations carry some) fades out before the patch edge. Blending happens at the crop's
stored resolution: the translated patch is resized up to the crop box and mixed with the ORIGINAL
full-resolution pixels, so nothing outside the lesion's centre loses detail.

Two ways to mix (`BlendMode`):
- "alpha", the paper's: the resized translation replaces the crop's centre. A translation made at
  the UNIT's patch side (32 px locally) carries no detail finer than that, so the centre of a
  blend is smooth where the radiograph around it has grain.
- "detail": the translator's change is what is blended, and the original keeps its grain:
      x_blend = x_h + alpha * up(x_hl - down(x_h))
  where down is the crop resized to the patch side as the translator saw it and up the resize
  back. It equals "alpha" applied to a translation that carries the source's own detail finer
  than the patch side, and a translator that changes nothing changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from boneaug.config import BlendMode

BLEND_MODES: tuple[str, ...] = get_args(BlendMode)


def alpha_mask(height: int, width: int | None = None, *, n: float) -> np.ndarray:
    """(H, W) float32 blending weights; pixel k of P sits at -1 + 2k/(P-1) (borders at +-1)."""
    if n <= 0:
        raise ValueError(f"blending exponent n must be > 0, got {n}")
    width = height if width is None else width
    if height < 1 or width < 1:
        raise ValueError(f"alpha mask needs a positive size, got {height}x{width}")

    def profile(size: int) -> np.ndarray:
        if size == 1:
            return np.ones(1, dtype=np.float64)
        coords = np.linspace(-1.0, 1.0, size)
        return np.cos(np.abs(coords) ** n * np.pi / 2)

    mask = np.outer(profile(height), profile(width))
    mask[np.abs(mask) < 1e-12] = 0.0  # cos(pi/2) is 6e-17, not 0
    return mask.astype(np.float32)


def blend_patch(original: np.ndarray, translated: np.ndarray, *, n: float) -> np.ndarray:
    """Blend two same-shape (h, w) patches with the alpha mask."""
    if original.shape != translated.shape:
        raise ValueError(f"patch shapes differ: original {original.shape}, "
                         f"translated {translated.shape}")
    alpha = alpha_mask(*original.shape, n=n)
    return (alpha * translated + (1.0 - alpha) * original).astype(np.float32)


def resize(patch: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float32 -> (height, width), bilinear (antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None, None]
    shrink = height < patch.shape[0] or width < patch.shape[1]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=shrink)
    return out[0, 0].numpy()


def paste_blended(image: np.ndarray, translated: np.ndarray, crop: Sequence[int], *,
                  n: float, mode: BlendMode = "alpha") -> np.ndarray:
    """A copy of `image` (H, W) with `translated` (S, S) blended into `crop` (module docstring:
    "alpha" mixes the resized translation in, "detail" adds the translator's change).

    Pixels outside the crop box are the original ones, bit for bit.
    """
    x0, y0, x1, y1 = (int(v) for v in crop)
    height, width = image.shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop {list(crop)} is empty or outside the {height}x{width} image")
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    out = image.copy()
    region = image[y0:y1, x0:x1].astype(np.float32)
    h, w = region.shape
    if mode == "alpha":
        blended = blend_patch(region, resize(translated, h, w), n=n)
    else:
        change = resize(translated - resize(region, *translated.shape), h, w)
        blended = region + alpha_mask(h, w, n=n) * change
    out[y0:y1, x0:x1] = np.clip(blended, 0.0, 1.0)
    return out
