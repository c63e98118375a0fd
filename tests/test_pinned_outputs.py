"""Pinned output slices of the tiny seeded networks, as diffusers pins its pipelines': a change to
the model code that changes what a seeded network computes fails here, on the CPU and, where a
GPU is present, on the GPU too. Change a slice only with a change meant to alter the outputs, and
say why in its commit."""

from __future__ import annotations

import pytest
import torch

from boneaug.models.drn import build_drn
from boneaug.models.unit import UNIT, UnitArch

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
ATOL = {"cpu": 1e-5, "cuda": 2e-3}  # cuDNN's kernels (TF32 off) sum in other orders

TRANSLATED = [0.63505, 0.49516, 0.44422, 0.31306, 0.30771, 0.69115, 0.13626, 0.25791, 0.65243]
DRN_FEATURES = [0.0, 0.193, 0.0, 0.16578, 0.33995, 0.1958, 0.66037, 0.23539, 0.18866, 0.0, 0.0,
                0.0]
DRN_LOGITS = [0.013316, 0.010334]


@pytest.fixture(autouse=True)
def exact_kernels() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _uniform(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_the_tiny_seeded_translator_gives_its_pinned_slice(device: str) -> None:
    arch = UnitArch(width=8, n_downsample=2, n_res=2, n_shared=1, disc_width=8, disc_layers=2,
                    disc_scales=2)
    unit = UNIT(arch, generator=torch.Generator().manual_seed(0)).eval().to(device)
    with torch.no_grad():
        # what the service and the augmentation pipeline run: patches in [0, 1] -> [0, 1]
        out = unit.translator()(_uniform((2, 1, 32, 32), 1, device))
    got = out[0, 0, 14:17, 14:17].flatten().cpu()
    assert got.tolist() == pytest.approx(TRANSLATED, abs=ATOL[device])
    assert out.mean().item() == pytest.approx(0.51026, abs=ATOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_the_tiny_seeded_drn_gives_its_pinned_features_and_logits(device: str) -> None:
    drn = build_drn("drn_d_22", num_classes=1, in_channels=1, width_mult=0.125,
                    downsample="maxpool", generator=torch.Generator().manual_seed(0))
    drn = drn.eval().to(device)
    x = _uniform((2, 1, 64, 32), 2, device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features, logits = drn.features(x), drn(x)
    assert features.shape == (2, 64, 8, 4)
    got = features[0, :3, 3:5, 1:3].flatten().cpu()
    assert got.tolist() == pytest.approx(DRN_FEATURES, abs=ATOL[device])
    assert logits.flatten().cpu().tolist() == pytest.approx(DRN_LOGITS, abs=ATOL[device])
