"""The one precision policy of every forward pass, in training and inference alike: bf16 autocast
on CUDA, fp32 elsewhere (CPU bf16 convolutions are slower than fp32 on the machines measured).
Training, pseudo-labelling and the service all run their networks under it, so a score or a
translation does not depend on which of them computed it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a CUDA `device`; a no-op elsewhere."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
