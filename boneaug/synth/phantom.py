"""Re-render a healthy image of a generated cohort with a lesion where we ask for one.

The cohort is a pure function of (SynthConfig, seed): the plan fixes every image's patient and
image rng streams (cohort.py), so any image can be rendered again, bit for bit, without reading
it. `render_image` draws only the quantum noise from its rng and takes the dynamic-range
compression and the VOI window from the lesion-free anatomy, so rendering the same ImageSpec
with the same rng state once without and once with a lesion gives two images that differ only
inside the lesion's box. That pair is a perfect translation (the "oracle" augmentation arm) and
a paired patch for a critic.

The lesion comes from the cohort's own lesion distribution (`sample_lesion` and the
region/size rules of `sample_patient`); only its axial position is chosen, by a 1-D search that
puts its projected centre as close as possible to a requested target.

Pure functions: no Ray, no storage I/O; randomness only from the Generator passed in.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from boneaug.config import SynthConfig
from boneaug.errors import DataError
from boneaug.io.dicom import decode_xray
from boneaug.synth.anatomy import Scene3D, build_scene
from boneaug.synth.cohort import (
    VISIBILITY_TRIES,
    ImageJob,
    lesion_visibility,
    patient_of,
    plan_body_part,
    plan_fractures,
)
from boneaug.synth.dicom_out import DicomIdentity, encode_dicom
from boneaug.synth.lesions import lesion_box, lesion_geometry
from boneaug.synth.raster import Placement
from boneaug.synth.render import RenderedImage, render_image, working_factor
from boneaug.synth.spec import (
    ImageSpec,
    LesionSpec,
    _diaphyseal_size,
    _metaphyseal_reach,
    image_pixel,
    lesion_centre,
    sample_image,
    sample_lesion,
)

Box = tuple[int, int, int, int]  # [x0, y0, x1, y1), stored-image pixels (x = column)
Zones = dict[str, tuple[tuple[float, float], ...]]

FRACTURE_PREFIX = "fracture"
COARSE_DU = 0.005  # axial grid of the search (~1.6 mm on a humerus)
REFINE_STEPS = 2  # each refinement shrinks the grid step 10x around the best u


# ------------------------------------------------------------------------------------ the plan

@functools.lru_cache(maxsize=8)
def _plan(config_json: str, group: str, seed: int, scale: float) -> dict[str, ImageJob]:
    """image_id -> job of one body part's plan (or the fracture corpus'); planning a full-size
    cohort takes ~10 ms, so repeated look-ups into the same cohort reuse it."""
    config = SynthConfig.model_validate_json(config_json)
    if group == FRACTURE_PREFIX:
        jobs = plan_fractures(config, seed=seed, scale=scale)
    else:
        jobs = plan_body_part(config, group, seed=seed, scale=scale)
    return {job.image_id: job for job in jobs}


def find_job(config: SynthConfig, image_id: str, *, seed: int, scale: float = 1.0) -> ImageJob:
    """The planned job of `image_id` in the cohort `generate_cohort(config, ..., seed=seed,
    scale=scale)` wrote. The body part is the id prefix ('humerus-000123' -> humerus)."""
    group = image_id.rsplit("-", 1)[0]
    known = sorted(config.counts) + [FRACTURE_PREFIX]
    if group not in known:
        raise DataError(
            f"image id {image_id!r} names no body part of this cohort: its prefix {group!r} is "
            f"not one of {known} (synth.counts plus the fracture corpus); pass an image_id "
            f"from the cohort's annotations.parquet")
    jobs = _plan(config.model_dump_json(), group, seed, scale)
    job = jobs.get(image_id)
    if job is None:
        ids = sorted(jobs)
        span = f"{ids[0]} .. {ids[-1]}" if ids else "no images"
        raise DataError(
            f"image id {image_id!r} is not in the plan of {group!r} (searched: {group}; "
            f"seed={seed}, scale={scale}: {len(ids)} images, {span}); check that the config, "
            f"seed and scale are those the cohort was generated with")
    return job


def image_spec(config: SynthConfig, image_id: str, *, seed: int,
               scale: float = 1.0) -> tuple[ImageSpec, np.random.Generator]:
    """The ImageSpec of `image_id` in the cohort `generate_cohort(config, [...], seed=seed)`
    wrote, and the rng positioned where render_image draws that image's quantum noise.

    Mirrors `cohort.render_job` (tests compare the render against the stored DICOM bytes).
    DataError naming the id and the body parts searched when the id is not in the plan.
    """
    job = find_job(config, image_id, seed=seed, scale=scale)
    patient = patient_of(job, config, seed)
    rng = np.random.default_rng([seed, job.stream, job.image_index])
    spec = sample_image(patient, config, rng, study_index=job.study_index)
    return spec, rng


# ------------------------------------------------------------------------------------ decoding

def decode_like_ingest(image: RenderedImage) -> np.ndarray:
    """(H, W) float32 in [0, 1], exactly what ingestion gets from the DICOM this image is
    written as: encode, then `decode_xray` (rescale, VOI window, MONOCHROME1 inversion).

    Not `image.pixels`: the DICOM window is rounded to DS strings and MONOCHROME1 files are
    inverted, so the two differ by a few 1e-4. The identity does not touch the pixels.
    """
    ident = DicomIdentity(image_id="phantom", patient_id=image.spec.patient.patient_id, seed=0,
                          study_date="20000101")
    return decode_xray(encode_dicom(image, ident), path="<phantom>").pixels


# ------------------------------------------------------------------------------------ geometry

def stored_lesion_box(spec: ImageSpec, lesion: LesionSpec, scene: Scene3D) -> Box | None:
    """The box `render_image` reports for `lesion` on `spec`'s framing, without rendering it
    (None when the lesion lies outside the frame). Same arithmetic as render_image; a test
    checks the two agree."""
    H, W = spec.height, spec.width
    f = working_factor(H)
    placement = Placement(spec.s_c, spec.t_c, spec.rotation_deg, spec.mirror,
                          spec.spacing_mm * f, -(-H // f), -(-W // f))
    x0, y0, x1, y1 = lesion_box(lesion_geometry(lesion, scene, spec.omega_deg), placement,
                                pad_px=1.0)
    pad = f + 1
    box = (max(0, x0 * f - pad), max(0, y0 * f - pad), min(W, x1 * f + pad), min(H, y1 * f + pad))
    return box if box[0] < box[2] and box[1] < box[3] else None


def box_centre(box: Box) -> tuple[float, float]:
    """(x, y) centre of a [x0, y0, x1, y1) box in pixel coordinates (pixel i spans [i, i+1))."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def box_inside(box: Box, outer: Box) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


def _check_box(box: Box, name: str) -> Box:
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{name} must be a box [x0, y0, x1, y1) with x0 < x1 and y0 < y1, "
                         f"got {box!r}")
    return (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


# ------------------------------------------------------------------------------------ lesions

@dataclass(frozen=True)
class LesionDraw:
    """One lesion from the cohort's distribution, before its axial position is chosen.

    `sample_patient` draws the region first and the position within it; here the position is
    chosen to hit a target and the region follows from the zone it falls in, so the random parts
    of both region rules are drawn up front and every candidate position sees the same draws.
    """

    metaphyseal: LesionSpec  # as drawn by sample_lesion, region set to metaphyseal
    diaphyseal: LesionSpec  # after _diaphyseal_size (u-independent)
    reach: bool  # an obvious metaphyseal lesion reaches the cortex (_metaphyseal_reach)

    def at(self, u: float, region: str, scene0: Scene3D) -> LesionSpec:
        """The lesion at axial position u in `region`; scene0: the view-0 scene, as in
        sample_patient."""
        if region == "diaphyseal":
            return replace(self.diaphyseal, u=u)
        lesion = replace(self.metaphyseal, u=u)
        return _metaphyseal_reach(lesion, scene0) if self.reach else lesion


def draw_lesion(body_part: str, canal: float, rng: np.random.Generator, *,
                conspicuity_range: tuple[float, float]) -> LesionDraw:
    """sample_lesion plus the random parts of sample_patient's region rules, from `rng`."""
    lesion = sample_lesion(body_part, rng, conspicuity_range=conspicuity_range)
    diaphyseal = _diaphyseal_size(replace(lesion, region="diaphyseal"), canal, rng)
    reach = lesion.conspicuity > 0.4 and bool(rng.random() < 0.8)
    return LesionDraw(replace(lesion, region="metaphyseal"), diaphyseal, reach)


@dataclass(frozen=True)
class _Frame:
    """What placing a lesion on one image needs: its spec and its scenes."""

    spec: ImageSpec
    scene: Scene3D  # at the image's view angle: projection, as render_image
    scene0: Scene3D  # at view 0: lesion zones and size rules, as sample_patient

    @classmethod
    def of(cls, spec: ImageSpec) -> _Frame:
        p = spec.patient
        return cls(spec, build_scene(p.body_part, p.body, spec.omega_deg),
                   build_scene(p.body_part, p.body, 0.0))

    def centre_px(self, lesion: LesionSpec) -> tuple[float, float]:
        """The projected lesion centre in stored pixels."""
        s, t = lesion_centre(lesion, self.scene, self.spec.omega_deg)
        return image_pixel(self.spec, s, t)


def _zone_of(u: float, zones: Zones) -> tuple[str, float, float]:
    for region, spans in zones.items():
        for lo, hi in spans:
            if lo <= u <= hi:
                return region, lo, hi
    raise RuntimeError(f"u={u} lies in no lesion zone of {zones}")


def place_lesion(draw: LesionDraw, frame: _Frame, target_xy: tuple[float, float]) -> LesionSpec:
    """The lesion of `draw` at the axial position u (within the lesion zones) whose projected
    centre lies closest to `target_xy` (stored pixels): a grid over every zone, then finer grids
    around the best u inside its zone. The region follows the zone."""
    zones = frame.scene0.lesion_zones
    tx, ty = target_xy

    def cost(u: float, region: str) -> float:
        px, py = frame.centre_px(draw.at(u, region, frame.scene0))
        return math.hypot(px - tx, py - ty)

    candidates = [(float(u), region) for region, spans in zones.items() for lo, hi in spans
                  for u in np.linspace(lo, hi, max(2, math.ceil((hi - lo) / COARSE_DU) + 1))]
    best = min(candidates, key=lambda c: cost(*c))
    step = COARSE_DU
    for _ in range(REFINE_STEPS):
        region, lo, hi = _zone_of(best[0], zones)
        grid = np.clip(best[0] + step * np.linspace(-1.0, 1.0, 21), lo, hi)
        best = min([(float(u), region) for u in grid] + [best], key=lambda c: cost(*c))
        step /= 10.0
    return draw.at(best[0], best[1], frame.scene0)


def lesion_candidates(spec: ImageSpec, config: SynthConfig, target: Box, rng: np.random.Generator,
                      *, tries: int = 6) -> list[tuple[LesionSpec, Box]]:
    """`tries` lesions drawn from `rng`, each placed on the target's centre, with their stored
    boxes; draws that fall outside the frame are left out. Geometry only: nothing is rendered."""
    frame = _Frame.of(spec)
    target_xy = box_centre(target)
    out = []
    for _ in range(tries):
        draw = draw_lesion(spec.body_part, spec.patient.body.canal, rng,
                           conspicuity_range=config.conspicuity_range)
        lesion = place_lesion(draw, frame, target_xy)
        box = stored_lesion_box(spec, lesion, frame.scene)
        if box is not None:
            out.append((lesion, box))
    return out


def pick_candidate(candidates: list[tuple[LesionSpec, Box]], target: Box,
                   within: Box | None = None) -> tuple[LesionSpec, Box]:
    """The candidate whose box lies inside `within` with its centre closest to the target's
    centre; when none fits inside (or `within` is None), the closest."""
    tx, ty = box_centre(target)

    def rank(candidate: tuple[LesionSpec, Box]) -> tuple[bool, float]:
        cx, cy = box_centre(candidate[1])
        fits = within is None or box_inside(candidate[1], within)
        return not fits, math.hypot(cx - tx, cy - ty)

    return min(candidates, key=rank)


def choose_lesion(spec: ImageSpec, config: SynthConfig, target: Box, rng: np.random.Generator,
                  *, within: Box | None = None, tries: int = 6) -> tuple[LesionSpec, Box]:
    """`lesion_candidates` then `pick_candidate`: the lesion to render and its stored box."""
    candidates = lesion_candidates(spec, config, target, rng, tries=tries)
    if not candidates:
        raise DataError(
            f"none of {tries} lesion draws projects into the {spec.height}x{spec.width} image "
            f"of {spec.patient.patient_id} near target {target}; pick a target on the bone")
    return pick_candidate(candidates, target, within)


# ------------------------------------------------------------------------------------ rendering

@dataclass(frozen=True)
class LesionRender:
    without: np.ndarray  # (H, W) float32 [0,1]: the image as stored (decoded like ingest)
    with_lesion: np.ndarray  # (H, W) float32 [0,1]: same image, same noise, with the lesion
    box: Box  # the lesion's box (RenderedImage.boxes[0]) in stored pixels
    lesion: LesionSpec


def _check_healthy(spec: ImageSpec, image_id: str) -> None:
    patient = spec.patient
    if patient.lesion is not None:
        raise DataError(f"image {image_id!r} already shows a lesion (label 1); the phantom adds "
                        f"lesions to healthy images only: pick a label-0 image")
    if patient.confounders:
        raise DataError(f"image {image_id!r} has confounders {list(patient.confounders)}; the "
                        f"phantom adds lesions to clean images only (confounders == [])")
    if patient.fracture is not None:
        raise DataError(f"image {image_id!r} shows a fracture; the phantom adds lesions to "
                        f"intact bones only (fracture == 0)")


def render_with_lesion(config: SynthConfig, image_id: str, *, seed: int, target: Box,
                       rng: np.random.Generator, within: Box | None = None, tries: int = 6,
                       scale: float = 1.0) -> LesionRender:
    """Re-render the healthy image `image_id` as stored and with a lesion placed on `target`.

    The lesion is drawn from the cohort's lesion distribution (`choose_lesion`: `tries` draws,
    each placed by a 1-D search over its axial position, the best fit kept); only the patient's
    lesion changes, framing, exposure, texture and quantum noise stay those of the stored image.
    `rng` draws the lesions only. `scale`: the scale the cohort was generated with.
    DataError when the image already has a lesion, confounders or a fracture.
    """
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    target = _check_box(target, "target")
    within = _check_box(within, "within") if within is not None else None
    spec, noise = image_spec(config, image_id, seed=seed, scale=scale)
    _check_healthy(spec, image_id)
    healthy = render_image(spec, copy.deepcopy(noise))
    best: tuple[float, RenderedImage, LesionSpec, Box] | None = None
    # like the cohort's own lesions: redrawn until their visibility is in SynthConfig's window
    for _ in range(VISIBILITY_TRIES if config.checks_visibility else 1):
        lesion, predicted = choose_lesion(spec, config, target, rng, within=within, tries=tries)
        lesion_spec = replace(spec, patient=replace(spec.patient, lesion=lesion))
        with_lesion = render_image(lesion_spec, copy.deepcopy(noise))
        if not with_lesion.boxes or tuple(with_lesion.boxes[0]) != predicted:
            raise RuntimeError(f"render_image's lesion box {with_lesion.boxes} differs from the "
                               f"predicted {predicted}: stored_lesion_box is out of date")
        miss = config.visibility_miss(
            lesion_visibility(with_lesion.pixels, healthy.pixels, config.visibility_pool))
        if best is None or miss < best[0]:
            best = (miss, with_lesion, lesion, predicted)
        if miss == 0:
            break
    assert best is not None
    _, with_lesion, lesion, predicted = best
    return LesionRender(without=decode_like_ingest(healthy),
                        with_lesion=decode_like_ingest(with_lesion), box=predicted, lesion=lesion)
