"""Rebuild a registered network from its architecture spec: what lets a model be stored as
plain weights (a state dict, loaded with ``weights_only=True``) plus a JSON spec, never as a
pickle that could run code when loaded.

Every network boneaug registers carries a ``spec`` attribute (a JSON-ready dict with a
``kind``) set by its factory: `boneaug.models.drn.build_drn` ("drn"),
`boneaug.models.unit.UNIT.translator` ("unit_translator"), `boneaug.eval.quality.PatchCritic`
("patch_critic") and `CriticEnsemble` ("critic_ensemble"). `build_from_spec` makes the same
architecture with fresh weights. No I/O here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from boneaug.errors import ModelError

KINDS = ("drn", "unit_translator", "patch_critic", "critic_ensemble")


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The architecture spec a registered model carries (its factory set it)."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ModelError(
            f"{type(model).__name__} carries no architecture spec (one of {KINDS}): only "
            "networks built by boneaug's factories (build_drn, UNIT.translator, PatchCritic, "
            "CriticEnsemble) can be registered without pickling them")
    return spec


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh network of the architecture `spec` describes (eval mode)."""
    kind = spec.get("kind")
    try:
        if kind == "drn":
            from boneaug.models.drn import build_drn

            model: nn.Module = build_drn(spec["arch"], num_classes=spec["num_classes"],
                                         in_channels=spec["in_channels"],
                                         width_mult=spec["width_mult"],
                                         downsample=spec["downsample"])
        elif kind == "unit_translator":
            from boneaug.models.unit import UNIT, UnitArch

            model = UNIT(UnitArch(**spec["arch"])).translator(spec["direction"])
        elif kind == "patch_critic":
            from boneaug.eval.quality import PatchCritic

            model = PatchCritic(spec["width"], spec["size"])
        elif kind == "critic_ensemble":
            from boneaug.eval.quality import CriticEnsemble, PatchCritic

            model = CriticEnsemble([PatchCritic(spec["width"], spec["size"])
                                    for _ in range(spec["members"])])
        else:
            raise ModelError(f"unknown model kind {kind!r}: expected one of {KINDS}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"malformed {kind} architecture spec {spec}: {exc}") from exc
    return model.eval()


__all__ = ["KINDS", "build_from_spec", "spec_of"]
