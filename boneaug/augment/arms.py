"""Translators: what turns healthy source patches into candidate lesion patches (SPEC 9).

One protocol, three arms; the pipeline blends, scores, selects and trains on whatever an arm
returns in exactly the same way, so the arms differ only in the patch they hand over:

- ``unit``: the trained UNIT's translation x_hl = G_l(E_h(x_h)) (the method, paper 3.1);
- ``copy_paste``: a real lesion patch of the translation training set, paired with the source
  at random (seeded per source patch): the floor a generator must beat to be worth its cost
  (cf. Ghiasi et al. 2021, "Simple Copy-Paste");
- ``oracle``: the same crop of the phantom's own re-render of the source image with a lesion
  drawn from the cohort's lesion distribution, centred on the source patch's box (synthetic
  cohorts only): what a perfect translator would hand over, the ceiling of the chain.

Each arm's randomness comes from ``rng([seed, crc32(patch_id)])``: a source patch gets the same
partner or lesion whatever batch it arrives in and however many workers there are.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from boneaug.config import SynthConfig
from boneaug.errors import ConfigError, DataError

Arm = Literal["unit", "copy_paste", "oracle"]
ARMS: tuple[Arm, ...] = ("unit", "copy_paste", "oracle")
Box = tuple[int, int, int, int]
ORACLE_MATCH_TOL = 1e-3  # stored patches are uint16-quantised: 1.5e-5 apart at most


@dataclass(frozen=True)
class SourceBatch:
    """Source patches and where they come from (rows of ``patches/source``)."""

    patches: np.ndarray  # (B, 1, S, S) float32 in [0, 1]
    patch_ids: list[str]
    image_ids: list[str]
    crops: list[Box]  # crop box in stored-image pixels
    boxes: list[Box]  # the matched lesion box carried into the source image


class PatchTranslator(Protocol):
    """source patches (B, 1, S, S) -> candidate lesion patches (B, 1, S, S), float32 [0, 1]."""

    def __call__(self, batch: SourceBatch) -> np.ndarray: ...


@dataclass(frozen=True)
class TranslatorSpec:
    """Which arm, and what it needs; picklable, so Ray ships it to the translate actors."""

    arm: Arm
    model_uri: str | None = None  # unit: a registered or logged translator
    lesion_patches_uri: str | None = None  # copy_paste: <run>/patches/lesion
    synth: SynthConfig | None = None  # oracle: the generator of the cohort
    seed: int = 0  # copy_paste pairing, oracle lesions (AugmentConfig.seed)

    def __post_init__(self) -> None:
        needs = {"unit": self.model_uri, "copy_paste": self.lesion_patches_uri,
                 "oracle": self.synth}
        if self.arm not in needs:
            raise ConfigError(f"unknown augmentation arm {self.arm!r}; choose one of {ARMS}")
        if needs[self.arm] is None:
            what = {"unit": "model_uri", "copy_paste": "lesion_patches_uri",
                    "oracle": "synth"}[self.arm]
            raise ConfigError(f"the {self.arm} arm needs {what}")

    @property
    def label(self) -> str:
        """What produced a candidate (its provenance): the model URI, or the arm's name."""
        return self.model_uri if self.arm == "unit" and self.model_uri else self.arm


def _rng(seed: int, patch_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(patch_id.encode())])


class UnitTranslator:
    """The method: a UNIT's h -> l translation."""

    def __init__(self, model_uri: str, device: str = "cpu") -> None:
        from boneaug.augment.translate import load_translator

        self.model = load_translator(model_uri)
        self.device = device

    def __call__(self, batch: SourceBatch) -> np.ndarray:
        from boneaug.augment.translate import translate_patches

        return translate_patches(self.model, batch.patches, device=self.device)


class CopyPaste:
    """The floor: each source patch gets a real lesion patch of the translation set."""

    def __init__(self, lesion_patches: np.ndarray, seed: int) -> None:
        if lesion_patches.ndim != 4 or len(lesion_patches) == 0:
            raise DataError("the copy-paste arm needs a non-empty lesion patch set "
                            f"(N, 1, S, S), got shape {lesion_patches.shape}")
        self.lesions = lesion_patches
        self.seed = seed

    def partner(self, patch_id: str) -> int:
        """Index of the lesion patch that source `patch_id` is paired with."""
        return int(_rng(self.seed, patch_id).integers(len(self.lesions)))

    def __call__(self, batch: SourceBatch) -> np.ndarray:
        if batch.patches.shape[1:] != self.lesions.shape[1:]:
            raise DataError(f"source patches {batch.patches.shape[1:]} and lesion patches "
                            f"{self.lesions.shape[1:]} differ in size: make both patch sets with "
                            "one profile")
        return np.stack([self.lesions[self.partner(p)] for p in batch.patch_ids])


class Oracle:
    """The ceiling: the phantom's own lesion at the source patch's box, at the same crop."""

    def __init__(self, synth: SynthConfig, seed: int) -> None:
        self.synth = synth
        self.seed = seed

    def __call__(self, batch: SourceBatch) -> np.ndarray:
        return np.stack([self.one(batch, i) for i in range(len(batch.patch_ids))])

    def one(self, batch: SourceBatch, i: int) -> np.ndarray:
        """(1, S, S): the crop of the re-render with a lesion; checks that the phantom's render
        without it is the stored source patch (else the cohort is not this generator's)."""
        from boneaug.data.patches import crop_resize
        from boneaug.synth.phantom import render_with_lesion

        size = batch.patches.shape[-1]
        render = render_with_lesion(self.synth, batch.image_ids[i], seed=self.synth.seed,
                                    target=batch.boxes[i], within=batch.crops[i],
                                    rng=_rng(self.seed, batch.patch_ids[i]))
        again = crop_resize(render.without, batch.crops[i], size)
        gap = float(np.abs(again - batch.patches[i, 0]).max())
        if gap > ORACLE_MATCH_TOL:
            raise DataError(
                f"the oracle arm cannot re-render source patch {batch.patch_ids[i]!r}: the "
                f"phantom's image {batch.image_ids[i]!r} differs from the stored one by up to "
                f"{gap:.3f}. The oracle needs the synthetic cohort that the configured synth "
                "section (and its seed) generates; regenerate the cohort or drop the oracle arm")
        return crop_resize(render.with_lesion, batch.crops[i], size)[None]


def build_translator(spec: TranslatorSpec, *, device: str = "cpu") -> PatchTranslator:
    """The arm `spec` names, loaded and ready."""
    if spec.arm == "unit":
        assert spec.model_uri is not None  # checked by TranslatorSpec
        return UnitTranslator(spec.model_uri, device)
    if spec.arm == "copy_paste":
        from boneaug.data.patch_sets import load_patch_array

        assert spec.lesion_patches_uri is not None
        return CopyPaste(load_patch_array(spec.lesion_patches_uri), spec.seed)
    assert spec.synth is not None
    return Oracle(spec.synth, spec.seed)


__all__ = ["ARMS", "Arm", "CopyPaste", "Oracle", "PatchTranslator", "SourceBatch",
           "TranslatorSpec", "UnitTranslator", "build_translator"]
