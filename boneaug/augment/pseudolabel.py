"""Pseudo-labelling (paper 3.4, SPEC 5): the baseline classifier keeps blended images scoring >= t.

The scorer is any module mapping (N, 1, H, W) images in [0, 1] to (N, 1) logits; the score is the
sigmoid probability. Selection is a pure function so a threshold sweep (t grid, Tune) scores once
and selects many times.
"""

from __future__ import annotations

import numpy as np
import torch

from boneaug.models.precision import autocast


@torch.no_grad()
def score_images(scorer: torch.nn.Module, images: np.ndarray, *,
                 batch_size: int = 16) -> np.ndarray:
    """(N, 1, H, W) float32 [0, 1] -> (N,) float32 lesion probabilities, on the scorer's device.

    The one place a DRN scores images: validation and test during training, pseudo-labels and
    the service, so all of them agree (bf16 autocast on CUDA, fp32 elsewhere). Eval mode for
    the call (a DDP wrapper is looked through); the scorer's mode is restored afterwards.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W), got {images.shape}")
    net: torch.nn.Module = getattr(scorer, "module", scorer)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size]),
                                dtype=torch.float32).to(device, non_blocking=True)
            with autocast(device):
                logits = net(x)
            out.append(torch.sigmoid(logits.float().reshape(len(x), -1)[:, 0]).cpu().numpy())
    finally:
        net.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def select(scores: np.ndarray, t: float) -> np.ndarray:
    """Boolean mask of the blended images kept as lesion examples: score >= t."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"pseudo-label threshold t must lie in [0, 1], got {t}")
    return np.asarray(scores) >= t
