"""boneaug.synth.phantom: a healthy cohort image re-rendered exactly as stored, the same image with
a lesion that changes only its box, lesions placed on a target, determinism, conspicuity, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from boneaug import storage
from boneaug.config import SplitCounts, SynthConfig, load_config
from boneaug.errors import DataError
from boneaug.io.dicom import decode_xray
from boneaug.synth.anatomy import build_scene, project_point
from boneaug.synth.cohort import generate_cohort
from boneaug.synth.phantom import (
    Box,
    box_centre,
    box_inside,
    choose_lesion,
    decode_like_ingest,
    image_spec,
    lesion_candidates,
    pick_candidate,
    render_with_lesion,
    stored_lesion_box,
)
from boneaug.synth.render import render_image
from boneaug.synth.spec import ImageSpec, image_pixel

SEED = 11
MIN_CONSPICUITY = 0.5
CENTRE_TOLERANCE_PX = 4.0  # ~6 mm at the smoke spacing (~1.5 mm/px); measured max 2.5 px


@pytest.fixture(scope="module")
def config() -> SynthConfig:
    """Smoke size, a small humerus cohort, lesions at conspicuity >= 0.5, and more confounded
    images than usual so that the error path has some to refuse."""
    base = load_config("smoke").synth
    counts = {**base.counts, "humerus": SplitCounts(train_pos=4, train_neg=12, val_pos=2,
                                                    val_neg=2, test_pos=2, test_neg=2)}
    confounders = {**base.confounder_fraction, "humerus": 0.3}
    return base.model_copy(update={"counts": counts, "min_conspicuity": MIN_CONSPICUITY,
                                   "confounder_fraction": confounders})


@pytest.fixture(scope="module")
def cohort(config: SynthConfig,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("phantom_cohort")
    generate_cohort(config, ["humerus"], str(root), seed=SEED, fractures=False, workers=1,
                    progress=False)
    return root, storage.read_parquet(str(root / "annotations.parquet")).to_pylist()


def _healthy(rows: list[dict], split: str = "train") -> list[dict]:
    return [r for r in rows if r["label"] == 0 and not r["confounders"] and r["split"] == split]


def _stored(root: Path, row: dict) -> np.ndarray:
    return decode_xray((root / row["key"]).read_bytes(), path=row["key"]).pixels


def _shaft_target(spec: ImageSpec, u: float, half: int = 6) -> Box | None:
    """A box around the projected shaft centre line at axial position u (None outside the frame,
    with a margin)."""
    scene = build_scene(spec.body_part, spec.patient.body, spec.omega_deg)
    (s, x, y), *_ = scene.shaft.at(u)
    ps, pt, _ = project_point((s, x, y), spec.omega_deg)
    px, py = image_pixel(spec, ps, pt)
    if not (2 * half < px < spec.width - 2 * half and 2 * half < py < spec.height - 2 * half):
        return None
    return (int(px) - half, int(py) - half, int(px) + half, int(py) + half)


def _targets(config: SynthConfig, rows: list[dict],
             us: tuple[float, ...]) -> list[tuple[str, float, Box]]:
    """(image_id, u, shaft box) for each row and axial position that projects into the frame."""
    out = []
    for row in rows:
        spec, _ = image_spec(config, row["image_id"], seed=SEED)
        for u in us:
            target = _shaft_target(spec, u)
            if target is not None:
                out.append((row["image_id"], u, target))
    return out


# ------------------------------------------------------------------------------------ re-rendering

def test_image_spec_reproduces_every_stored_image(config, cohort) -> None:
    """Healthy, lesion and confounded images alike: the spec + noise rng render the stored
    pixels, and the predicted lesion box is the annotated one."""
    root, rows = cohort
    assert {r["label"] for r in rows} == {0, 1} and any(r["confounders"] for r in rows)
    for row in rows:
        spec, rng = image_spec(config, row["image_id"], seed=SEED)
        image = render_image(spec, rng)
        assert np.array_equal(decode_like_ingest(image), _stored(root, row)), row["image_id"]
        assert image.boxes == row["boxes"], row["image_id"]
        if spec.patient.lesion is not None:
            scene = build_scene(spec.body_part, spec.patient.body, spec.omega_deg)
            assert [list(stored_lesion_box(spec, spec.patient.lesion, scene))] == row["boxes"]


def test_without_is_the_stored_image(config, cohort) -> None:
    root, rows = cohort
    healthy = _healthy(rows)
    assert {r["photometric"] for r in healthy} == {"MONOCHROME1", "MONOCHROME2"}
    for row in healthy:
        spec, _ = image_spec(config, row["image_id"], seed=SEED)
        target = _shaft_target(spec, 0.5)
        assert target is not None
        out = render_with_lesion(config, row["image_id"], seed=SEED, target=target,
                                 rng=np.random.default_rng(0))
        stored = _stored(root, row)
        assert out.without.dtype == np.float32 and out.without.shape == stored.shape
        assert np.array_equal(out.without, stored), row["image_id"]


def test_lesion_changes_only_its_box_and_shows_inside(config, cohort) -> None:
    _, rows = cohort
    cases = _targets(config, _healthy(rows)[:5], (0.15, 0.5, 0.85))
    assert len(cases) >= 8
    for k, (image_id, _, target) in enumerate(cases):
        out = render_with_lesion(config, image_id, seed=SEED, target=target,
                                 rng=np.random.default_rng(k))
        x0, y0, x1, y1 = out.box
        inside = np.zeros(out.without.shape, bool)
        inside[y0:y1, x0:x1] = True
        diff = np.abs(out.with_lesion - out.without)  # (H, W)
        assert out.with_lesion.dtype == np.float32
        assert 0.0 <= out.with_lesion.min() and out.with_lesion.max() <= 1.0
        assert np.array_equal(out.with_lesion[~inside], out.without[~inside]), image_id
        assert out.lesion.conspicuity >= MIN_CONSPICUITY
        assert diff[inside].max() > 0.02, (image_id, out.lesion)


# ------------------------------------------------------------------------------------ placement

def test_lesion_lands_on_the_target(config, cohort) -> None:
    _, rows = cohort
    cases = _targets(config, _healthy(rows), (0.12, 0.5, 0.85))
    errors = []
    for k, (image_id, u, target) in enumerate(cases):
        spec, _ = image_spec(config, image_id, seed=SEED)
        x0, y0, x1, y1 = target
        within = (max(0, x0 - 40), max(0, y0 - 40), min(spec.width, x1 + 40),
                  min(spec.height, y1 + 40))
        out = render_with_lesion(config, image_id, seed=SEED, target=target, within=within,
                                 rng=np.random.default_rng(100 + k))
        (cx, cy), (tx, ty) = box_centre(out.box), box_centre(target)
        errors.append(math.hypot(cx - tx, cy - ty))
        assert errors[-1] <= CENTRE_TOLERANCE_PX, (image_id, u, target, out.box)
        assert box_inside(out.box, within), (image_id, out.box, within)
        # the region follows the zone the position falls in
        zones = build_scene(spec.body_part, spec.patient.body, 0.0).lesion_zones
        assert any(lo <= out.lesion.u <= hi for lo, hi in zones[out.lesion.region])
        if u == 0.5:
            assert out.lesion.region == "diaphyseal"
        else:
            assert out.lesion.region == "metaphyseal"
    assert len(errors) >= 20 and float(np.median(errors)) <= 2.0


def test_within_that_nothing_fits_falls_back_to_the_closest(config, cohort) -> None:
    _, rows = cohort
    image_id, _, target = _targets(config, _healthy(rows), (0.5,))[0]
    spec, _ = image_spec(config, image_id, seed=SEED)
    tiny = (target[0], target[1], target[0] + 1, target[1] + 1)
    free = choose_lesion(spec, config, target, np.random.default_rng(3))
    tight = choose_lesion(spec, config, target, np.random.default_rng(3), within=tiny)
    assert not box_inside(tight[1], tiny)
    assert free == tight


def test_within_prefers_a_lesion_that_fits_over_a_closer_one(config, cohort) -> None:
    """`within` = the box of a candidate other than the closest: that one is returned."""
    _, rows = cohort
    checked = 0
    for k, (image_id, _, target) in enumerate(_targets(config, _healthy(rows), (0.15, 0.5))):
        spec, _ = image_spec(config, image_id, seed=SEED)
        candidates = lesion_candidates(spec, config, target, np.random.default_rng(k))
        closest = pick_candidate(candidates, target)
        others = [c for c in candidates if not box_inside(closest[1], c[1])]
        if not others:
            continue
        within = others[0][1]
        lesion, box = choose_lesion(spec, config, target, np.random.default_rng(k), within=within)
        assert box_inside(box, within) and lesion != closest[0]
        out = render_with_lesion(config, image_id, seed=SEED, target=target, within=within,
                                 rng=np.random.default_rng(k))
        assert out.box == box and out.lesion == lesion
        checked += 1
    assert checked >= 5


def test_more_tries_land_closer(config, cohort) -> None:
    _, rows = cohort
    one, six = [], []
    for k, (image_id, _, target) in enumerate(_targets(config, _healthy(rows), (0.15, 0.5))):
        spec, _ = image_spec(config, image_id, seed=SEED)
        tx, ty = box_centre(target)
        for tries, errs in ((1, one), (6, six)):
            _, box = choose_lesion(spec, config, target, np.random.default_rng(k), tries=tries)
            cx, cy = box_centre(box)
            errs.append(math.hypot(cx - tx, cy - ty))
    assert np.mean(six) < np.mean(one)


# ------------------------------------------------------------------------------------ randomness

def test_same_rng_seed_same_render_other_seed_other_lesion(config, cohort) -> None:
    _, rows = cohort
    image_id, _, target = _targets(config, _healthy(rows), (0.5,))[0]
    a = render_with_lesion(config, image_id, seed=SEED, target=target, rng=np.random.default_rng(7))
    b = render_with_lesion(config, image_id, seed=SEED, target=target, rng=np.random.default_rng(7))
    c = render_with_lesion(config, image_id, seed=SEED, target=target, rng=np.random.default_rng(8))
    assert np.array_equal(a.with_lesion, b.with_lesion) and a.box == b.box and a.lesion == b.lesion
    assert np.array_equal(a.without, c.without)  # the stored image does not depend on the rng
    assert a.lesion != c.lesion
    assert not np.array_equal(a.with_lesion, c.with_lesion)


def test_conspicuity_respects_the_configured_minimum(config, cohort) -> None:
    _, rows = cohort
    image_id, _, target = _targets(config, _healthy(rows), (0.15,))[0]
    spec, _ = image_spec(config, image_id, seed=SEED)
    seen = []
    for k in range(30):
        lesion, _ = choose_lesion(spec, config, target, np.random.default_rng(k), tries=1)
        seen.append(lesion.conspicuity)
        assert 0.10 <= lesion.width_frac <= 0.75
    assert min(seen) >= MIN_CONSPICUITY and max(seen) - min(seen) > 0.2


def test_lesions_are_redrawn_toward_the_cohort_visibility_window(config, cohort) -> None:
    """A window no draw reaches keeps the draw nearest to it: above every draw, the most visible
    of VISIBILITY_TRIES; just above zero, the least visible."""
    from boneaug.synth.cohort import lesion_visibility

    _, rows = cohort
    image_id, _, target = _targets(config, _healthy(rows), (0.15,))[0]

    def shown(window: tuple[float, float]) -> float:
        cfg = config.model_copy(update={"min_visibility": window[0], "max_visibility": window[1]})
        out = render_with_lesion(cfg, image_id, seed=SEED, target=target,
                                 rng=np.random.default_rng(3), tries=1)
        return lesion_visibility(out.with_lesion, out.without, cfg.visibility_pool)

    one_draw = shown((0.0, 1.0))  # no window: the first draw, as before
    faint, strong = shown((1e-6, 2e-6)), shown((0.98, 1.0))
    assert faint < strong and faint <= one_draw <= strong


# ------------------------------------------------------------------------------------ errors

def test_ids_outside_the_plan_are_refused(config) -> None:
    with pytest.raises(DataError, match="humerus-009999") as info:
        image_spec(config, "humerus-009999", seed=SEED)
    assert "searched: humerus" in str(info.value)
    with pytest.raises(DataError, match="radius-000001") as info:
        image_spec(config, "radius-000001", seed=SEED)
    assert "humerus" in str(info.value) and "fracture" in str(info.value)


def test_lesion_confounded_and_fractured_images_are_refused(config, cohort) -> None:
    _, rows = cohort
    lesion_id = next(r["image_id"] for r in rows if r["label"] == 1)
    confounded_id = next(r["image_id"] for r in rows if r["label"] == 0 and r["confounders"])
    target = (40, 100, 60, 120)
    for image_id, what in ((lesion_id, "lesion"), (confounded_id, "confounders")):
        with pytest.raises(DataError, match=image_id) as info:
            render_with_lesion(config, image_id, seed=SEED, target=target,
                               rng=np.random.default_rng(0))
        assert what in str(info.value)
    fractured = next(i for i in (f"fracture-{k:06d}" for k in range(40))
                     if image_spec(config, i, seed=SEED)[0].patient.fracture is not None)
    with pytest.raises(DataError, match=fractured):
        render_with_lesion(config, fractured, seed=SEED, target=target,
                           rng=np.random.default_rng(0))


def test_bad_boxes_are_refused(config, cohort) -> None:
    _, rows = cohort
    image_id = _healthy(rows)[0]["image_id"]
    with pytest.raises(ValueError, match="target"):
        render_with_lesion(config, image_id, seed=SEED, target=(10, 10, 5, 20),
                           rng=np.random.default_rng(0))
