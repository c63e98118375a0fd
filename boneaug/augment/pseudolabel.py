"""Pseudo-labelling (paper 3.4, SPEC 5): the baseline classifier keeps blended images scoring >= t.

The scorer is any module mapping (N, 1, H, W) images in [0, 1] to (N, 1) logits; the score is the
sigmoid probability. Selection is a pure function so a threshold sweep (t grid, Tune) scores once
and selects many times.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def score_images(scorer: torch.nn.Module, images: np.ndarray, *, batch_size: int = 16,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """(N, 1, H, W) float32 [0, 1] -> (N,) lesion probabilities, batched, no grad."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W), got {images.shape}")
    scorer = scorer.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        out.append(torch.sigmoid(scorer(batch).float().reshape(len(batch), -1)[:, 0]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def select(scores: np.ndarray, t: float) -> np.ndarray:
    """Boolean mask of the blended images kept as lesion examples: score >= t."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"pseudo-label threshold t must lie in [0, 1], got {t}")
    return np.asarray(scores) >= t
