"""Trained models run on images one way: training, pseudo-labels and the service agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from boneaug import serving
from boneaug.augment.pseudolabel import score_images
from boneaug.augment.translate import translate_patches
from boneaug.errors import ModelError
from boneaug.models.drn import build_drn
from boneaug.train.classifier import predict


def test_training_pseudo_labels_and_the_service_give_one_score_per_image() -> None:
    model = build_drn("drn_d_22", width_mult=0.125, downsample="maxpool",
                      generator=torch.Generator().manual_seed(0))
    model.train()
    images = np.random.default_rng(0).random((7, 1, 64, 32), dtype=np.float32)
    batched = predict(model, images, batch_size=3)  # validation during training
    assert predict is score_images
    assert batched.shape == (7,) and batched.dtype == np.float32
    np.testing.assert_allclose(serving.run_scorer(model, images), batched, rtol=1e-5, atol=1e-6)
    assert model.training  # the caller's mode comes back
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        score_images(model, images[:, 0])


class _Cropper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:, 1:] * self.scale


def test_a_translator_that_changes_the_patch_shape_is_refused_in_both_paths() -> None:
    patches = np.full((2, 1, 8, 8), 0.5, np.float32)
    for run in (lambda: translate_patches(_Cropper(), patches),
                lambda: serving.run_translator(_Cropper(), patches)):
        with pytest.raises(ModelError, match="not a patch-to-patch translator"):
            run()
