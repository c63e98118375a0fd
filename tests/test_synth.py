"""boneaug.synth: determinism, DICOM validity, boxes that hold the lesion, patient splits, counts,
MONOCHROME1 share, conspicuity, fractures, merging, and a cohort on a real S3-protocol server."""

from __future__ import annotations

import copy
import dataclasses
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pydicom
import pytest
from PIL import Image

from boneaug import storage
from boneaug.config import BoneaugConfig, SynthConfig, load_config
from boneaug.errors import ConfigError
from boneaug.synth.cohort import (
    ANNOTATION_SCHEMA,
    CohortSummary,
    generate_cohort,
    lesion_visibility,
    patient_of,
    plan_body_part,
    plan_fractures,
    render_job,
)
from boneaug.synth.dicom_out import DicomIdentity, encode_dicom
from boneaug.synth.preview import contact_sheet, display_pixels
from boneaug.synth.render import render_image
from boneaug.synth.spec import sample_image, sample_spec

PARTS = ("humerus", "tibia", "femur")


@pytest.fixture(scope="module")
def synth(smoke_config: BoneaugConfig) -> SynthConfig:
    return smoke_config.synth


@pytest.fixture(scope="module")
def cohort(synth: SynthConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The whole smoke cohort with the fracture corpus, rendered by two worker processes."""
    root = tmp_path_factory.mktemp("cohort")
    summary = generate_cohort(synth, PARTS, str(root), seed=0, fractures=True, workers=2,
                              progress=False)
    rows = storage.read_parquet(str(root / "annotations.parquet")).to_pylist()
    assert summary.images == len(rows) > 0
    return root, rows


def _read(root: Path, row: dict) -> pydicom.Dataset:
    return pydicom.dcmread(root / row["key"])


# ------------------------------------------------------------------------------------ determinism

def test_same_seed_same_bytes_whatever_the_worker_count(cohort, synth, tmp_path: Path) -> None:
    root, rows = cohort
    again = tmp_path / "again"
    generate_cohort(synth, ["tibia"], str(again), seed=0, workers=1, progress=False)
    tibia = [r for r in rows if r["body_part"] == "tibia" and r["task"] == "lesion"]
    for row in tibia:
        assert (again / row["key"]).read_bytes() == (root / row["key"]).read_bytes(), row["key"]
    assert storage.read_parquet(str(again / "annotations.parquet")).to_pylist() == tibia


def test_different_seed_differs(cohort, synth, tmp_path: Path) -> None:
    root, rows = cohort
    other = tmp_path / "other"
    generate_cohort(synth, ["humerus"], str(other), seed=1, workers=1, progress=False)
    first = next(r for r in rows if r["image_id"] == "humerus-000000")
    assert (other / first["key"]).read_bytes() != (root / first["key"]).read_bytes()
    assert pydicom.dcmread(other / first["key"]).SOPInstanceUID != _read(root, first).SOPInstanceUID


def test_render_is_a_pure_function_of_spec_and_rng(synth) -> None:
    spec = sample_spec("femur", synth, np.random.default_rng(4), lesion=True,
                       confounders=("hardware",))
    a = render_image(spec, np.random.default_rng(9))
    b = render_image(spec, np.random.default_rng(9))
    c = render_image(spec, np.random.default_rng(10))
    assert np.array_equal(a.stored, b.stored) and a.boxes == b.boxes
    assert not np.array_equal(a.stored, c.stored)  # only the quantum noise differs
    assert a.pixels.dtype == np.float32 and a.pixels.shape == (synth.height, synth.width)
    assert 0.0 <= a.pixels.min() and a.pixels.max() <= 1.0


def test_a_lesion_image_kept_from_the_visibility_check_is_the_image_rendered_afresh(
        synth) -> None:
    """render_job keeps the render that the visibility check drew for a lesion patient's first
    image instead of drawing it twice more: its bytes, box and visibility must be those of the
    image rendered afresh from its spec and noise rng (and the window must redraw some)."""
    config = synth.model_copy(update={"min_visibility": 0.04, "max_visibility": 0.10})
    seed = 5
    jobs = [j for j in plan_body_part(config, "humerus", seed=seed, scale=1.0) if j.label == 1]
    redrawn = 0
    for job in jobs:
        data, row = render_job(job, config, seed)
        patient = patient_of(job, config, seed)
        redrawn += patient != _first_draw(job, config, seed)
        rng = np.random.default_rng([seed, job.stream, job.image_index])
        spec = sample_image(patient, config, rng, study_index=job.study_index)
        without_rng = copy.deepcopy(rng)
        fresh = render_image(spec, rng)
        without = render_image(spec.without_lesion(), without_rng)
        ident = DicomIdentity(image_id=job.image_id, patient_id=job.patient_id, seed=seed,
                              study_date=pydicom.dcmread(io.BytesIO(data)).StudyDate)
        assert data == encode_dicom(fresh, ident), job.image_id
        assert row["boxes"] == fresh.boxes
        assert row["visibility"] == lesion_visibility(fresh.pixels, without.pixels,
                                                      config.visibility_pool)
    assert len(jobs) >= 4 and redrawn >= 1


def _first_draw(job, config: SynthConfig, seed: int):  # noqa: ANN202
    """The patient before any visibility redraw."""
    return patient_of(job, config.model_copy(update={"min_visibility": 0.0,
                                                      "max_visibility": 1.0}), seed)


# ------------------------------------------------------------------------------------ DICOM

def test_every_file_is_valid_dicom_with_the_required_tags(cohort) -> None:
    root, rows = cohort
    uids = set()
    body = {"humerus": "HUMERUS", "tibia": "TIBIA", "femur": "FEMUR"}
    for row in rows:
        ds = _read(root, row)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality in ("CR", "DX")
        assert ds.BodyPartExamined == body[row["body_part"]]
        assert ds.PhotometricInterpretation == row["photometric"]
        assert (ds.Rows, ds.Columns) == (row["rows"], row["columns"])
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PixelRepresentation == 0
        assert float(ds.PixelSpacing[0]) == pytest.approx(row["pixel_spacing_mm"], rel=1e-4)
        assert ds.PatientID == row["patient_id"]
        lateral = {"L": "LL", "R": "RL"}[ds.ImageLaterality]
        assert ds.ViewPosition == ("AP" if row["view"] == "AP" else lateral)
        assert float(ds.WindowWidth) > 0 and "WindowCenter" in ds
        assert float(ds.RescaleSlope) > 0 and "RescaleIntercept" in ds
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and pixels.max() <= 4095
        uids.add(ds.SOPInstanceUID)
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 2 * len(rows)  # SOP and series UIDs are all distinct


def test_dicom_display_matches_the_rendered_pixels_for_every_encoding(synth) -> None:
    spec = sample_spec("tibia", synth, np.random.default_rng(3), lesion=True)
    image = render_image(spec, np.random.default_rng(1))
    ident = DicomIdentity("tibia-x", "P1", 0, "20200101")
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        for rescale in ((1.0, 0.0), (1.0, -1024.0), (0.5, 0.0), (2.0, -4096.0)):
            encoded = dataclasses.replace(spec, photometric=photometric, rescale=rescale)
            variant = dataclasses.replace(image, spec=encoded)
            ds = pydicom.dcmread(io.BytesIO(encode_dicom(variant, ident)))
            assert ds.PhotometricInterpretation == photometric
            assert np.abs(display_pixels(ds) - image.pixels).max() < 2e-3, (photometric, rescale)


def test_display_is_bright_bone_grey_tissue_dark_air(synth) -> None:
    spec = sample_spec("humerus", synth, np.random.default_rng(0), view="AP")
    spec = dataclasses.replace(spec, exposure=dataclasses.replace(spec.exposure, collimation=None))
    pixels = render_image(spec, np.random.default_rng(0)).pixels
    air = np.concatenate([pixels[:, :3].ravel(), pixels[:, -3:].ravel()])
    h, w = spec.height, spec.width
    centre = pixels[h // 3: 2 * h // 3, w // 2 - 4: w // 2 + 4]
    assert np.percentile(air, 10) < 0.1  # some air at the frame edge is black
    assert np.percentile(centre, 90) > 0.6  # the humeral shaft is bright


# ------------------------------------------------------------------------------------ lesions

@pytest.mark.parametrize("part", PARTS)
def test_box_is_inside_the_image_and_holds_the_whole_lesion(synth, part: str) -> None:
    for k in range(6):
        spec = sample_spec(part, synth, np.random.default_rng([k, 11]), lesion=True,
                           conspicuity=k / 5)
        with_lesion = render_image(spec, np.random.default_rng(5))
        without = render_image(spec.without_lesion(), np.random.default_rng(5))
        assert len(with_lesion.boxes) == 1 and without.boxes == []
        x0, y0, x1, y1 = with_lesion.boxes[0]
        assert 0 <= x0 < x1 <= spec.width and 0 <= y0 < y1 <= spec.height
        diff = with_lesion.stored.astype(np.int32) - without.stored.astype(np.int32)
        outside = np.ones(diff.shape, bool)
        outside[y0:y1, x0:x1] = False
        assert not diff[outside].any(), "the lesion changed pixels outside its box"
        assert diff[y0:y1, x0:x1].any(), "no lesion inside the box"


def test_conspicuity_orders_how_visible_lesions_are() -> None:
    """Rose SNR of each lesion (mean contrast over its footprint x sqrt(footprint / 4 correlated
    pixels) / noise): it rises with the recorded conspicuity; subtle lesions stay near the
    detection limit of an ideal observer in white noise (real readers also fight trabecular
    texture and overlapping anatomy), obvious ones are far above it."""
    from boneaug.config import load_config

    synth = load_config("local").synth  # lesions span many pixels here
    cs, snr = [], []
    for i in range(24):
        c = (i // 3) / 7
        spec = sample_spec(PARTS[i % 3], synth, np.random.default_rng([5, i]), lesion=True,
                           conspicuity=c)
        a = render_image(spec, np.random.default_rng(1))
        b = render_image(spec.without_lesion(), np.random.default_rng(1)).pixels
        n = render_image(spec.without_lesion(), np.random.default_rng(2)).pixels
        x0, y0, x1, y1 = a.boxes[0]
        box = (slice(y0, y1), slice(x0, x1))
        noise = float((n - b)[box].std()) / np.sqrt(2)
        d = np.abs(a.pixels - b)[box]
        foot = d > 0.25 * noise
        cs.append(c)
        snr.append(float(d[foot].mean() * np.sqrt(foot.sum() / 4) / noise) if foot.any() else 0.0)
    spearman = np.corrcoef(np.argsort(np.argsort(cs)), np.argsort(np.argsort(snr)))[0, 1]
    assert spearman > 0.6, (spearman, snr)
    subtle = [s for c, s in zip(cs, snr, strict=True) if c < 0.2]
    obvious = [s for c, s in zip(cs, snr, strict=True) if c > 0.8]
    assert max(subtle) < 30.0, subtle
    assert min(obvious) > 40.0, obvious


# ------------------------------------------------------------------------------------ cohort

def test_counts_splits_and_patients(cohort, synth) -> None:
    _, rows = cohort
    lesion_rows = [r for r in rows if r["task"] == "lesion"]
    assert len({r["image_id"] for r in rows}) == len(rows)
    for part in PARTS:
        clean = Counter((r["split"], r["label"]) for r in lesion_rows
                        if r["body_part"] == part and not r["confounders"])
        want = synth.counts[part].scaled(1.0)
        for split in ("train", "val", "test"):
            assert clean[(split, 1)] == getattr(want, f"{split}_pos")
            assert clean[(split, 0)] == getattr(want, f"{split}_neg")
    by_patient = defaultdict(list)
    for r in rows:
        by_patient[r["patient_id"]].append(r)
    for images in by_patient.values():
        assert 1 <= len(images) <= 3
        shared = {(r["split"], r["label"], r["body_part"], r["task"], r["fracture"])
                  for r in images}
        assert len(shared) == 1
        assert len({tuple(r["confounders"]) for r in images}) == 1
    splits = defaultdict(set)
    for r in rows:
        splits[r["split"]].add(r["patient_id"])
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    assert not (splits["val"] & splits["test"])
    for r in lesion_rows:
        assert (r["label"] == 1) == bool(r["boxes"]) == (r["conspicuity"] is not None)


def test_the_summary_reads_as_counts_per_split() -> None:
    summary = CohortSummary(
        out_uri="/tmp/c", counts={"humerus": {"train": {0: 25, 1: 8}, "test": {0: 8, 1: 4}}},
        clean_counts={"humerus": {"train": {0: 24, 1: 8}, "test": {0: 8, 1: 4}}},
        fracture_counts={"train": {0: 30, 1: 10}}, images=85, seconds=2.0, images_per_s=42.5,
        workers=2)
    assert summary.describe().splitlines() == [
        "wrote 85 images to /tmp/c in 2.0 s (42.5 img/s, 2 worker(s)); lesion:non-lesion per "
        "split",
        "  humerus: test 4:8  train 8:25  (without confounders: test 4:8  train 8:24)",
        "  fracture corpus (fracture:none): train 10:30"]


def test_annotation_table_follows_the_contract(cohort) -> None:
    root, _ = cohort
    table = storage.read_parquet(str(root / "annotations.parquet"))
    assert table.schema.equals(ANNOTATION_SCHEMA)
    assert all((root / key).is_file() for key in table.column("key").to_pylist())


def test_counts_scale_and_confounder_rates(synth) -> None:
    scaled = plan_body_part(synth, "femur", seed=0, scale=2.0)
    clean = Counter((j.split, j.label) for j in scaled if not j.confounders)
    want = synth.counts["femur"].scaled(2.0)
    assert clean[("train", 1)] == want.train_pos and clean[("test", 0)] == want.test_neg
    from boneaug.config import load_config

    local = load_config("local").synth
    for part in PARTS:
        jobs = plan_body_part(local, part, seed=0, scale=1.0)
        share = np.mean([bool(j.confounders) for j in jobs])
        assert abs(share - local.confounder_fraction[part]) < 0.05, (part, share)
        if part != "humerus":  # tibia/femur positives carry confounders more often (paper 4.3)
            pos = np.mean([bool(j.confounders) for j in jobs if j.label])
            neg = np.mean([bool(j.confounders) for j in jobs if not j.label])
            assert pos > 1.5 * neg


def test_monochrome1_share(cohort, synth, tmp_path: Path) -> None:
    _, rows = cohort
    share = np.mean([r["photometric"] == "MONOCHROME1" for r in rows])
    assert abs(share - synth.monochrome1_fraction) < 0.1
    always = synth.model_copy(update={"monochrome1_fraction": 1.0})
    generate_cohort(always, ["humerus"], str(tmp_path), scale=0.25, workers=1, progress=False)
    table = storage.read_parquet(str(tmp_path / "annotations.parquet")).to_pylist()
    assert {r["photometric"] for r in table} == {"MONOCHROME1"}
    stored = {pydicom.dcmread(tmp_path / r["key"]).PhotometricInterpretation for r in table}
    assert stored == {"MONOCHROME1"}


def test_fracture_corpus(cohort, synth) -> None:
    _, rows = cohort
    fr = [r for r in rows if r["task"] == "fracture"]
    assert len(fr) == synth.fracture_images
    assert {r["label"] for r in fr} == {0} and all(r["boxes"] == [] for r in fr)
    assert {r["body_part"] for r in fr} == set(PARTS)
    assert 0.3 < np.mean([r["fracture"] for r in fr]) < 0.7
    assert all(r["key"].startswith("dicom/fracture/") for r in fr)
    assert len(plan_fractures(synth, seed=0, scale=0.5)) == round(synth.fracture_images * 0.5)


def test_a_fracture_changes_the_bone(synth) -> None:
    spec = sample_spec("tibia", synth, np.random.default_rng(2), fracture=True)
    broken = render_image(spec, np.random.default_rng(1)).stored.astype(int)
    whole = dataclasses.replace(spec, patient=dataclasses.replace(spec.patient, fracture=None))
    intact = render_image(whole, np.random.default_rng(1)).stored.astype(int)
    assert np.abs(broken - intact).max() > 100


def test_writing_one_body_part_merges_and_removes_stale_files(synth, tmp_path: Path) -> None:
    root = str(tmp_path)
    generate_cohort(synth, ["humerus", "tibia"], root, scale=0.5, workers=1, progress=False)
    before = storage.read_parquet(root + "/annotations.parquet").to_pylist()
    humerus = [r for r in before if r["body_part"] == "humerus"]
    generate_cohort(synth, ["tibia"], root, scale=0.25, workers=1, progress=False)
    after = storage.read_parquet(root + "/annotations.parquet").to_pylist()
    assert [r for r in after if r["body_part"] == "humerus"] == humerus
    tibia_rows = [r for r in after if r["body_part"] == "tibia"]
    assert 0 < len(tibia_rows) < len([r for r in before if r["body_part"] == "tibia"])
    on_disk = sorted(p.name for p in (tmp_path / "dicom" / "tibia").iterdir())
    assert on_disk == sorted(r["key"].rsplit("/", 1)[1] for r in tibia_rows)


def test_bad_arguments_fail_clearly(synth, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown body part"):
        generate_cohort(synth, ["radius"], str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="scale"):
        generate_cohort(synth, ["tibia"], str(tmp_path), scale=0, progress=False)


# ------------------------------------------------------------------------------------ preview, S3

def test_contact_sheet(cohort, tmp_path: Path) -> None:
    root, _ = cohort
    out = tmp_path / "sheet.png"
    contact_sheet(str(root), str(out), n=12, body_part="femur")
    sheet = Image.open(out)
    assert sheet.width > 300 and sheet.height > 300
    red = np.asarray(sheet.convert("RGB")).astype(int)
    assert ((red[..., 0] > 200) & (red[..., 1] < 80)).any()  # lesion boxes were drawn


def test_cohort_on_s3_round_trips(s3_bucket: str, synth) -> None:
    root = f"{s3_bucket}/cohort"
    summary = generate_cohort(synth, ["tibia"], root, scale=0.25, workers=1, progress=False)
    rows = storage.read_parquet(storage.join(root, "annotations.parquet")).to_pylist()
    assert len(rows) == summary.images
    keys = storage.list_files(storage.join(root, "dicom"), suffix=".dcm")
    assert sorted(k.split("/cohort/", 1)[1] for k in keys) == sorted(r["key"] for r in rows)
    ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(storage.join(root, rows[0]["key"]))))
    assert ds.PatientID == rows[0]["patient_id"]
    contact_sheet(root, storage.join(root, "preview.png"), n=6)
    assert storage.read_bytes(storage.join(root, "preview.png"))[:8] == b"\x89PNG\r\n\x1a\n"


def test_fracture_corpus_alone_merges_into_an_existing_cohort(tmp_path) -> None:
    """Adding only the fracture corpus to a root that holds a body part keeps that body part."""
    from boneaug.config import load_config as _load
    from boneaug.synth.cohort import generate_cohort as _generate

    config = _load("smoke").synth
    root = str(tmp_path / "cohort")
    _generate(config, ["femur"], root, seed=1, scale=0.3, workers=1, progress=False)
    _generate(config, [], root, seed=1, scale=0.3, fractures=True, workers=1, progress=False)
    table = storage.read_parquet(storage.join(root, "annotations.parquet"))
    assert set(table.column("task").to_pylist()) == {"lesion", "fracture"}
    assert "femur" in set(table.column("body_part").to_pylist())


def test_conspicuity_range_bounds_the_drawn_lesions_and_keeps_the_rest_of_the_draw() -> None:
    from boneaug.synth.spec import sample_lesion

    subtle_allowed = [sample_lesion("tibia", np.random.default_rng(i)) for i in range(200)]
    obvious_only = [sample_lesion("tibia", np.random.default_rng(i), conspicuity_range=(0.6, 1.0))
                    for i in range(200)]
    middle = [sample_lesion("tibia", np.random.default_rng(i), conspicuity_range=(0.4, 0.8))
              for i in range(200)]
    assert min(les.conspicuity for les in subtle_allowed) < 0.1
    assert max(les.conspicuity for les in subtle_allowed) > 0.9
    assert min(les.conspicuity for les in obvious_only) >= 0.6
    assert 0.4 <= min(les.conspicuity for les in middle) < 0.45
    assert 0.75 < max(les.conspicuity for les in middle) <= 0.8
    # the same draws otherwise: lesion types come from the same stream
    assert [les.lesion_type for les in subtle_allowed] == [les.lesion_type for les in obvious_only]
    assert [les.lesion_type for les in middle] == [les.lesion_type for les in obvious_only]


def test_an_empty_conspicuity_range_or_visibility_window_is_refused() -> None:
    local = load_config("local").synth.model_dump()
    with pytest.raises(ValueError, match="must be below max_conspicuity"):
        SynthConfig.model_validate(local | {"max_conspicuity": 0.3})
    with pytest.raises(ValueError, match="must be below max_visibility"):
        SynthConfig.model_validate(local | {"min_visibility": 0.1, "max_visibility": 0.05})


def test_a_cohort_with_fractures_of_a_body_part_still_lacks_that_body_parts_lesion_cohort(
    tmp_path: Path, smoke_config: BoneaugConfig
) -> None:
    """The fracture corpus spans body parts: ensure_cohort must still synthesise the lesion
    cohort."""
    from boneaug.workflow import ensure_cohort

    root = str(tmp_path / "cohort")
    ensure_cohort(smoke_config, root, ["humerus"], synthesize=True)  # humerus + fracture corpus
    table = storage.read_parquet(storage.join(root, "annotations.parquet"))
    fracture_parts = set(table.filter(pc.equal(table.column("task"), "fracture"))
                         .column("body_part").to_pylist())
    assert "tibia" in fracture_parts
    ensure_cohort(smoke_config, root, ["tibia"], synthesize=True)
    table = storage.read_parquet(storage.join(root, "annotations.parquet"))
    lesion_rows = table.filter(pc.not_equal(table.column("task"), "fracture"))
    assert set(lesion_rows.column("body_part").to_pylist()) == {"humerus", "tibia"}
    assert storage.list_files(storage.join(root, "dicom", "tibia"))


def test_visibility_is_measured_for_every_lesion_and_the_window_redraws_what_lies_outside(
        synth: SynthConfig, cohort, tmp_path: Path) -> None:
    from boneaug.synth.cohort import lesion_visibility

    # the measure: the largest change to one pixel of the pooled image
    a, b = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    a[0, 0] = 0.8  # one stored pixel: a quarter of it in a 2x2 pool
    assert lesion_visibility(a, b, 1) == pytest.approx(0.8)
    assert lesion_visibility(a, b, 2) == pytest.approx(0.2)
    # every positive of the cohort carries its measured visibility, no negative does
    _, rows = cohort
    lesions = [r for r in rows if r["task"] == "lesion"]
    assert all((r["visibility"] is not None) == (r["label"] == 1) for r in lesions)
    seen = sorted(r["visibility"] for r in lesions if r["label"] == 1)
    # with a minimum, the patients whose lesion did not show are drawn anew
    floor = float(np.quantile(seen, 0.5))
    strict = synth.model_copy(update={"min_visibility": floor, "images_per_patient": 1})
    generate_cohort(strict, ["humerus"], str(tmp_path), seed=0, workers=1, progress=False)
    again = storage.read_parquet(str(tmp_path / "annotations.parquet")).to_pylist()
    shown = np.array([r["visibility"] for r in again if r["label"] == 1])
    # (a patient none of whose 12 draws shows keeps its most visible one: rare)
    assert shown.size and (shown >= floor).mean() >= 0.9
    loose = [r["visibility"] for r in lesions if r["label"] == 1 and r["body_part"] == "humerus"]
    assert np.mean(shown) > np.mean(loose)
    # a window also redraws the lesions that show too much
    low, high = (float(q) for q in np.quantile(seen, [0.25, 0.6]))
    window = synth.model_copy(update={"min_visibility": low, "max_visibility": high,
                                      "images_per_patient": 1})
    generate_cohort(window, ["humerus"], str(tmp_path / "window"), seed=0, workers=1,
                    progress=False)
    inside = np.array([r["visibility"] for r in storage.read_parquet(
        str(tmp_path / "window" / "annotations.parquet")).to_pylist() if r["label"] == 1])
    assert inside.size and ((inside >= low) & (inside <= high)).mean() >= 0.9
    assert np.mean(inside > high) < np.mean(np.array(loose) > high)
