"""How pixel arrays travel in Parquet: raw little-endian uint16, row-major, with height/width
columns.

Images and patches are float32 in [0, 1] in memory; on disk they are quantised to 16 bits (more
than the 12-bit detectors they come from), which halves the bytes of float32 and keeps Parquet
readable by any tool without Ray's tensor extension types.
"""

from __future__ import annotations

import numpy as np

SCALE = 65535.0


def encode_pixels(pixels: np.ndarray) -> bytes:
    """(H, W) float in [0, 1] -> bytes (uint16 LE). Values outside [0, 1] are clipped."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) array, got shape {pixels.shape}")
    quantised = np.rint(np.clip(pixels, 0.0, 1.0) * SCALE).astype("<u2")
    return quantised.tobytes()


def decode_pixels(data: bytes, height: int, width: int) -> np.ndarray:
    """bytes (uint16 LE) -> (H, W) float32 in [0, 1]."""
    expected = height * width * 2
    if len(data) != expected:
        raise ValueError(
            f"pixel buffer holds {len(data)} bytes, expected {expected} for {height}x{width} uint16"
        )
    return np.frombuffer(data, dtype="<u2").reshape(height, width).astype(np.float32) / SCALE
