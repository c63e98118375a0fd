"""End to end over the loopback S3 server: synthetic cohort -> Ray Data ingestion -> patch sets."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from boneaug import storage
from boneaug.config import BoneaugConfig
from boneaug.data.arrays import decode_pixels
from boneaug.data.ingest import classification_filter, ingest
from boneaug.data.patch_sets import KINDS, load_patch_array, make_patch_sets
from boneaug.data.patches import near_duplicate_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort_on_s3(s3_endpoint: str, smoke_config: BoneaugConfig) -> str:
    import boto3

    from boneaug.synth.cohort import generate_cohort

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="ingest-e2e")
    root = "s3://ingest-e2e/cohort"
    generate_cohort(smoke_config.synth, ["tibia"], root, seed=3, workers=1, progress=False)
    # bad objects among the good ones: each is rejected with a reason, the rest go through
    victim = storage.list_files(storage.join(root, "dicom", "tibia"))[5]
    storage.write_bytes(victim, storage.read_bytes(victim)[:3000])  # truncated mid-pixels
    storage.write_bytes(storage.join(root, "dicom", "tibia", "stray.dcm"), b"DICM" + b"\x00" * 200)
    return root


def _ingest(root: str, config: BoneaugConfig, run: str):
    return ingest(data_uri=root, run_uri=storage.join(root, "runs", run), image=config.image,
                  descriptor_rows=config.patches.descriptor_size, body_part="tibia")


def test_ingest_conserves_counts_and_rejects_the_bad_file(
    cohort_on_s3: str, smoke_config: BoneaugConfig, ray_session: None
) -> None:
    summary = _ingest(cohort_on_s3, smoke_config, "r1")
    annotated = storage.read_parquet(storage.join(cohort_on_s3, "annotations.parquet"))
    total = pc.sum(pc.equal(annotated.column("body_part"), "tibia")).as_py()
    assert total >= smoke_config.synth.counts["tibia"].total  # + images with confounders
    assert summary.listed == total + 1
    assert summary.written == total - 1 and summary.rejected == 2
    rejects = storage.read_parquet(storage.join(cohort_on_s3, "runs", "r1",
                                                "rejects.parquet")).to_pylist()
    assert {r["reason"] for r in rejects} == {"truncated", "no_annotation"}
    assert all(r["path"].rsplit("/", 1)[-1] in r["message"] for r in rejects)

    images = storage.read_parquet(storage.join(cohort_on_s3, "runs", "r1", "images"))
    assert images.num_rows == total - 1
    assert set(images.column("height").to_pylist()) == {smoke_config.image.height}
    for row in images.filter(pc.equal(images.column("label"), 1)).to_pylist():
        assert row["boxes"], f"{row['image_id']} is a lesion image without a box"
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
    clean = classification_filter(images)
    assert all(not c for c in clean.column("confounders").to_pylist())
    assert storage.read_manifest(storage.join(cohort_on_s3, "runs", "r1",
                                              "images"))["written"] == total - 1


def test_rerun_replaces_instead_of_duplicating(
    cohort_on_s3: str, smoke_config: BoneaugConfig, ray_session: None
) -> None:
    _ingest(cohort_on_s3, smoke_config, "r2")
    first = storage.read_parquet(storage.join(cohort_on_s3, "runs", "r2", "images")).num_rows
    _ingest(cohort_on_s3, smoke_config, "r2")
    assert storage.read_parquet(storage.join(cohort_on_s3, "runs", "r2",
                                             "images")).num_rows == first


def test_patch_sets_have_spec_2_properties_and_provenance(
    cohort_on_s3: str, smoke_config: BoneaugConfig, ray_session: None
) -> None:
    run = storage.join(cohort_on_s3, "runs", "r1")
    if storage.read_manifest(storage.join(run, "images")) is None:
        _ingest(cohort_on_s3, smoke_config, "r1")
    settings = smoke_config.patches.body_parts["tibia"]
    summary = make_patch_sets(data_uri=cohort_on_s3, run_uri=run, body_part="tibia",
                              settings=settings, size=smoke_config.patches.size,
                              min_mean_intensity=smoke_config.patches.min_mean_intensity, seed=0)
    assert summary.written["lesion"] == summary.written["normal"] > 0  # class-balanced
    assert summary.written["source"] > 0
    images = {r["image_id"]: r
              for r in storage.read_parquet(storage.join(run, "images")).to_pylist()}
    sets = {k: storage.read_parquet(storage.join(run, "patches", k)).to_pylist() for k in KINDS}
    translation_negatives = {p["image_id"] for p in sets["normal"]}
    for kind, rows in sets.items():
        for p in rows:
            image = images[p["image_id"]]
            assert image["split"] == "train", "patches come from the training split only"
            x0, y0, x1, y1 = p["crop"]
            assert 0 <= x0 < x1 <= image["stored_columns"] and 0 <= y0 < y1 <= image["stored_rows"]
            bx0, by0, bx1, by1 = p["box"]
            assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1
            assert (p["s"] == settings.s
                    and (p["height"], p["width"]) == (smoke_config.patches.size,) * 2)
            if kind == "lesion":
                assert (image["label"] == 1
                        and list(p["box"]) in [list(b) for b in image["stored_boxes"]])
            else:
                assert image["label"] == 0 and not image["confounders"]
                pixels = decode_pixels(p["pixels"], p["height"], p["width"])
                assert pixels.mean() >= smoke_config.patches.min_mean_intensity - 1e-4
                assert images[p["matched_image_id"]]["label"] == 1
    assert translation_negatives.isdisjoint({p["image_id"] for p in sets["source"]})
    lesion = load_patch_array(storage.join(run, "patches", "lesion"))
    assert lesion.shape == (summary.written["lesion"], 1, smoke_config.patches.size,
                            smoke_config.patches.size)
    assert lesion.dtype == np.float32 and 0 <= lesion.min() and lesion.max() <= 1
    assert storage.read_manifest(storage.join(run, "patches"))["written"] == summary.written
    # near-duplicates are counted over the patches written, not the candidates cut
    assert summary.near_duplicates == {
        kind: near_duplicate_pairs((p["image_id"], p["crop"]) for p in rows)
        for kind, rows in sets.items()}


def test_an_object_that_cannot_be_read_is_a_reject_not_a_crash(
    cohort_on_s3: str, smoke_config: BoneaugConfig
) -> None:
    from boneaug.data.ingest import DecodeBatch

    root_path = storage.filesystem(cohort_on_s3)[1]
    decode = DecodeBatch({}, root_path, smoke_config.image, smoke_config.patches.descriptor_size)
    gone = storage.join(cohort_on_s3, "dicom", "tibia", "deleted-after-listing.dcm")
    there = storage.list_files(storage.join(cohort_on_s3, "dicom", "tibia"))[0]
    # the batch's objects are fetched together: the missing one fails alone
    rows = decode({"uri": np.array([there, gone])}).to_pylist()
    assert [r["reason"] for r in rows] == ["no_annotation", "unreadable"]
    assert rows[1]["key"] == "dicom/tibia/deleted-after-listing.dcm" and not rows[1]["ok"]
    assert "does not exist" in rows[1]["message"]
