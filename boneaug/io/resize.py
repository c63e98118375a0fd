"""Fit an image inside a fixed (H, W) keeping its aspect, pad the rest, and map boxes across.

The mapping from stored-image coordinates to fitted coordinates is exact, not approximate:
``x' = x * scale + pad_x`` and ``y' = y * scale + pad_y`` hold for pixel edges (a box
``[x0, y0, x1, y1]`` with exclusive ``x1``/``y1`` maps edge to edge). The resampler is told the
same `scale` that is returned (it is not recomputed from rounded output sizes), so a box drawn on
the stored image lands on the same anatomy in the fitted one.

Resampling is bilinear with antialiasing (a triangle filter widened by 1/scale when shrinking),
which is what PIL's BILINEAR does; `torch` is the default because it measured about twice as fast
as PIL's float32 'F' mode on 2500x2000 -> 640x512 here (single thread; ``benchmarks/bench_dicom.py``
prints both). The two agree to ~1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Method = Literal["torch", "pil"]
Box = tuple[int, int, int, int]


def fit_scale(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, fitted_h, fitted_w) so that (h, w) * scale fits inside `target` = (H, W).

    `fitted_* = floor(size * scale)` exactly as the resampler computes it, and the limiting
    side fills its target side exactly (the scale is nudged by ulps where floating point would
    leave it one pixel short).
    """
    (h, w), (th, tw) = size, target
    if min(h, w, th, tw) < 1:
        raise ValueError(f"sizes must be positive, got image {size} and target {target}")
    scale = min(th / h, tw / w)
    limit, limit_target = (h, th) if th / h <= tw / w else (w, tw)
    for _ in range(16):  # floor(limit * scale) may land one short of its target by an ulp
        if math.floor(limit * scale) >= limit_target:
            break
        scale = math.nextafter(scale, math.inf)
    fh, fw = min(th, math.floor(h * scale)), min(tw, math.floor(w * scale))
    return scale, max(fh, 1), max(fw, 1)


def resample(pixels: np.ndarray, scale: float, out_hw: tuple[int, int], *,
             method: Method = "torch") -> np.ndarray:
    """(h, w) float32 -> (out_h, out_w) float32, bilinear + antialias,
    source coordinate = dest / scale."""
    out_h, out_w = out_hw
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    if method == "torch":
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(src)[None, None]  # (1, 1, h, w)
        h, w = src.shape
        if math.floor(h * scale) >= out_h and math.floor(w * scale) >= out_w:
            # recompute_scale_factor=False: the kernel maps coordinates with exactly `scale`
            y = F.interpolate(x, scale_factor=(scale, scale), mode="bilinear", antialias=True,
                              align_corners=False, recompute_scale_factor=False)
        else:  # a degenerate side (under 1 px at this scale): resample to the size asked
            y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                              align_corners=False)
        out = y[0, 0].numpy()  # (floor(h*scale), floor(w*scale))
        return np.ascontiguousarray(out[:out_h, :out_w])
    if method == "pil":
        from PIL import Image

        image = Image.fromarray(src)  # mode 'F'
        h, w = src.shape
        # the source region that maps onto the output (clamped where a side is degenerate)
        box = (0.0, 0.0, min(float(w), out_w / scale), min(float(h), out_h / scale))
        return np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box),
                          dtype=np.float32)
    raise ValueError(f"unknown resize method {method!r}: use 'torch' or 'pil'")


def fit_pad(pixels: np.ndarray, target: tuple[int, int], *, method: Method = "torch",
            fill: float = 0.0) -> tuple[np.ndarray, float, int, int]:
    """Resize (h, w) to fit inside `target` = (H, W) keeping the aspect, centre it, pad with `fill`.

    Returns (out (H, W) float32, scale, pad_x, pad_y) with x' = x * scale + pad_x.
    """
    if pixels.ndim != 2:
        raise ValueError(f"fit_pad expects a 2-D (H, W) image, got shape {pixels.shape}")
    th, tw = target
    scale, fh, fw = fit_scale(pixels.shape, target)
    if fh == pixels.shape[0] and fw == pixels.shape[1] and scale == 1.0:
        fitted = np.asarray(pixels, dtype=np.float32)
    else:
        fitted = resample(pixels, scale, (fh, fw), method=method)
    pad_y, pad_x = (th - fh) // 2, (tw - fw) // 2
    if (fh, fw) == (th, tw):
        return np.ascontiguousarray(fitted), scale, 0, 0
    out = np.full((th, tw), fill, dtype=np.float32)  # (H, W)
    out[pad_y:pad_y + fh, pad_x:pad_x + fw] = fitted
    return out, scale, pad_x, pad_y


def map_box(box: Sequence[float], scale: float, pad_x: int, pad_y: int, *,
            size: tuple[int, int] | None = None) -> Box:
    """Stored-image box [x0, y0, x1, y1] -> the fitted image's box (the smallest int box
    enclosing it).

    With `size` = (H, W) the result is clipped to the image and kept at least 1 px wide and high.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {list(box)} has x1 < x0 or y1 < y0; boxes are [x0, y0, x1, y1]")
    eps = 1e-6  # keep an exactly-integer product from flooring/ceiling one step too far
    out = [math.floor(x0 * scale + pad_x + eps), math.floor(y0 * scale + pad_y + eps),
           math.ceil(x1 * scale + pad_x - eps), math.ceil(y1 * scale + pad_y - eps)]
    if size is not None:
        out = _clip_box(out, size)
    return out[0], out[1], out[2], out[3]


def unmap_box(box: Sequence[float], scale: float, pad_x: int, pad_y: int, *,
              size: tuple[int, int] | None = None) -> Box:
    """The inverse of `map_box`: a fitted-image box -> the stored image's enclosing box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    eps = 1e-6
    out = [math.floor((x0 - pad_x) / scale + eps), math.floor((y0 - pad_y) / scale + eps),
           math.ceil((x1 - pad_x) / scale - eps), math.ceil((y1 - pad_y) / scale - eps)]
    if size is not None:
        out = _clip_box(out, size)
    return out[0], out[1], out[2], out[3]


def _clip_box(box: list[int], size: tuple[int, int]) -> list[int]:
    h, w = size
    x0 = min(max(box[0], 0), w - 1)
    y0 = min(max(box[1], 0), h - 1)
    x1 = min(max(box[2], x0 + 1), w)
    y1 = min(max(box[3], y0 + 1), h)
    return [x0, y0, x1, y1]
