"""The augmentation arms (boneaug.augment.arms): the copy-paste floor's seeded pairing and the
oracle ceiling's phantom lesions, on a real (smoke) synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boneaug import storage
from boneaug.augment.arms import CopyPaste, Oracle, SourceBatch, TranslatorSpec, build_translator
from boneaug.config import SplitCounts, SynthConfig, load_config
from boneaug.data.patches import crop_resize
from boneaug.errors import ConfigError, DataError
from boneaug.io.dicom import decode_xray
from boneaug.synth.cohort import generate_cohort
from boneaug.synth.phantom import image_spec

SEED = 5
SIZE = 32


@pytest.fixture(scope="module")
def synth() -> SynthConfig:
    base = load_config("smoke").synth
    counts = {**base.counts, "humerus": SplitCounts(train_pos=2, train_neg=6, val_pos=1,
                                                    val_neg=1, test_pos=1, test_neg=1)}
    return base.model_copy(update={"counts": counts, "min_conspicuity": 0.6,
                                   "confounder_fraction": {"humerus": 0.0}})


@pytest.fixture(scope="module")
def sources(synth: SynthConfig, tmp_path_factory: pytest.TempPathFactory) -> SourceBatch:
    """Healthy training images of the cohort, each cropped (as patch-making does) around a box
    on its bone's shaft, the way a source patch is cut around a matched lesion box."""
    root = tmp_path_factory.mktemp("arms_cohort")
    generate_cohort(synth, ["humerus"], str(root), seed=synth.seed, workers=1, progress=False)
    rows = [r for r in storage.read_parquet(str(root / "annotations.parquet")).to_pylist()
            if r["label"] == 0 and r["split"] == "train"][:4]
    patches, crops, boxes = [], [], []
    for row in rows:
        spec, _ = image_spec(synth, row["image_id"], seed=synth.seed)
        cx, cy = spec.width // 2, spec.height // 2  # the bone runs through the frame's centre
        box = (cx - 8, cy - 10, cx + 8, cy + 10)
        crop = (cx - 20, cy - 20, cx + 20, cy + 20)
        image = decode_xray((root / row["key"]).read_bytes()).pixels
        patches.append(crop_resize(image, crop, SIZE)[None])
        crops.append(crop)
        boxes.append(box)
    return SourceBatch(patches=np.stack(patches), patch_ids=[f"{r['image_id']}-s" for r in rows],
                       image_ids=[r["image_id"] for r in rows], crops=crops, boxes=boxes)


def test_copy_paste_pairs_each_source_with_a_real_lesion_patch_by_its_id(
        sources: SourceBatch) -> None:
    lesions = np.random.default_rng(0).random((7, 1, SIZE, SIZE), dtype=np.float32)
    arm = CopyPaste(lesions, seed=3)
    out = arm(sources)
    assert out.shape == sources.patches.shape
    for patch, pid in zip(out, sources.patch_ids, strict=True):
        assert np.array_equal(patch, lesions[arm.partner(pid)])  # a real lesion patch, unchanged
    # the pairing follows the patch id, not the batch: the reversed batch gets the same partners
    flipped = SourceBatch(sources.patches[::-1], sources.patch_ids[::-1], sources.image_ids[::-1],
                          sources.crops[::-1], sources.boxes[::-1])
    assert np.array_equal(arm(flipped), out[::-1])
    partners = {CopyPaste(lesions, seed=s).partner("x-s") for s in range(40)}
    assert len(partners) == 7  # the seed draws the pairing; every lesion patch gets used
    with pytest.raises(DataError, match="differ in size"):
        CopyPaste(lesions[:, :, :16, :16], seed=3)(sources)


def test_oracle_paints_the_phantoms_own_lesion_into_the_source_patch(
        synth: SynthConfig, sources: SourceBatch) -> None:
    out = Oracle(synth, seed=1)(sources)
    assert out.shape == sources.patches.shape and out.dtype == np.float32
    diff = np.abs(out - sources.patches)[:, 0]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for d in diff:
        assert d.max() > 0.02  # a visible lesion
        # where it changed the patch: centred on the target box (patch pixels 8-24 both ways)
        cy, cx = (d * yy).sum() / d.sum(), (d * xx).sum() / d.sum()
        assert 8 <= cy <= 24 and 8 <= cx <= 24
    assert np.array_equal(Oracle(synth, seed=1)(sources), out)  # seeded per patch id
    assert not np.array_equal(Oracle(synth, seed=2)(sources), out)


def test_oracle_refuses_a_cohort_that_its_generator_did_not_make(
        synth: SynthConfig, sources: SourceBatch) -> None:
    # a source patch the phantom does not render (another cohort's, or edited)
    with pytest.raises(DataError, match="differs from the stored one"):
        Oracle(synth, seed=1)(SourceBatch(
            sources.patches[:1] * 0.5, sources.patch_ids[:1], sources.image_ids[:1],
            sources.crops[:1], sources.boxes[:1]))


def test_a_translator_spec_names_what_its_arm_needs(tmp_path: Path, synth: SynthConfig) -> None:
    with pytest.raises(ConfigError, match="needs lesion_patches_uri"):
        TranslatorSpec("copy_paste")
    with pytest.raises(ConfigError, match="unknown augmentation arm"):
        TranslatorSpec("mixup")  # type: ignore[arg-type]
    assert TranslatorSpec("oracle", synth=synth).label == "oracle"
    assert isinstance(build_translator(TranslatorSpec("oracle", synth=synth)), Oracle)
