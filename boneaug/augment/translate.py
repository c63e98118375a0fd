"""Translate healthy patches into lesion patches with a trained UNIT translator (paper 3.1, 3.3).

x_hl = G_l(E_h(x_h)), deterministic (no latent noise), batched, without gradients. Patches,
not whole radiographs, go through the network: memory stays bounded by `batch_size` patches
(the reference ran out of memory translating whole images).

`load_translator` accepts:
- a registry or run URI: ``models:/boneaug-unit-tibia@challenger``, ``models:/name/3``,
  ``runs:/<run_id>/translator`` (MLflow, see `boneaug.tracking`);
- a training checkpoint: a Ray checkpoint directory holding ``state.pt``, or the file itself;
- a finished run: ``<run_uri>/unit`` (its ``final.pt``), or that file;
each as s3://, file:// or a path.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from boneaug import storage
from boneaug.errors import ModelError, StorageError
from boneaug.models.precision import autocast
from boneaug.models.unit import UNIT, Translator, UnitArch
from boneaug.train.distributed import CHECKPOINT_FILE

FINAL_FILE = "final.pt"  # boneaug.train.unit writes it beside its checkpoints (CHECKPOINT_FILE)


@torch.no_grad()
def translate_patches(
    model: Translator | nn.Module,
    patches: np.ndarray,  # (N, 1, S, S) float32 in [0, 1]
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """(N, 1, S, S) float32 [0, 1] -> translated (N, 1, S, S) float32 [0, 1].

    Runs on `device` (default: where the model's parameters are) in eval mode; the model's
    train/eval mode and device are restored afterwards. bf16 autocast on CUDA.
    """
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[1] != 1:
        raise ValueError(f"patches must be (N, 1, S, S), got shape {patches.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(patches) == 0:
        return np.zeros(patches.shape, np.float32)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    target = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(target)
    out = np.empty(patches.shape, np.float32)
    try:
        for start in range(0, len(patches), batch_size):
            # a copy: the clamp must not write into the caller's array (read-only when it came
            # from Ray's object store)
            x = torch.tensor(patches[start : start + batch_size], dtype=torch.float32,
                             device=target).clamp_(0.0, 1.0)
            if target.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(target):
                y = model(x)
            if y.shape != x.shape:
                raise ModelError(f"translator returned shape {tuple(y.shape)} for input "
                                 f"{tuple(x.shape)}: not a patch-to-patch translator")
            out[start : start + len(x)] = y.float().clamp_(0.0, 1.0).cpu().numpy()
    finally:
        model.train(was_training).to(home)
    return out


def translator_from_state(state: dict, *, direction: str = "h2l") -> Translator:
    """A CPU `Translator` from a training checkpoint or final-weights dict (eval mode)."""
    try:
        arch = UnitArch(**state["arch"])
        unit = UNIT(arch)
        unit.load_state_dict(state["unit"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(
            f"not a UNIT checkpoint (expected keys 'arch' and 'unit' with matching weights): {exc}"
        ) from exc
    return unit.translator(direction).eval()


def _read_state(uri: str) -> dict | None:
    try:
        data = storage.read_bytes(uri)
    except StorageError:
        return None
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ModelError(f"{uri} holds a {type(obj).__name__}, not a UNIT checkpoint dict")
    return obj


def load_translator(uri: str, *, direction: str = "h2l") -> nn.Module:
    """The h -> l translator (``direction="l2h"``: the reverse) from a model URI, checkpoint or run.

    Registry/run URIs hold the h -> l `Translator` as it was registered (`direction` must be
    "h2l" for them). Everything comes back on the CPU in eval mode.
    """
    if uri.startswith(("models:/", "runs:/")):
        if direction != "h2l":
            raise ValueError(f"{uri} holds the registered h2l translator; direction={direction!r} "
                             "needs a checkpoint or run URI")
        from boneaug import tracking

        return tracking.load_torch_model(uri)
    candidates = [uri] if uri.endswith(".pt") else [
        storage.join(uri, CHECKPOINT_FILE), storage.join(uri, FINAL_FILE)]
    for candidate in candidates:
        state = _read_state(candidate)
        if state is not None:
            return translator_from_state(state, direction=direction)
    raise ModelError(
        f"no UNIT translator at {uri!r}: not a models:/ or runs:/ URI, and none of {candidates} "
        "exists. Pass a registered model (models:/boneaug-unit-<body_part>@challenger), a Ray "
        "checkpoint directory or <run_uri>/unit of a finished training."
    )


__all__ = ["load_translator", "translate_patches", "translator_from_state"]
