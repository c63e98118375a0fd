"""What one synthetic radiograph shows, as plain frozen dataclasses, and how they are sampled.

A `PatientSpec` holds what is fixed for a person (bone size and shape, soft tissue, the lesion,
hardware, deformity, a fracture); an `ImageSpec` adds what changes from one radiograph to the next
(view, framing, rotation, exposure, external objects, DICOM encoding). `render.render_image`
turns an ImageSpec into pixels; everything random in the picture except quantum noise is decided
here, so the same spec renders the same anatomy, lesion and texture.

Heterogeneity per body part (SPEC 1.2): humerus views are uniform (AP or lateral, little
rotation, mostly the whole bone); tibia and femur views vary a lot (obliques, in-plane rotation,
knee- or hip/ankle-centred crops, collimation, wider exposure range, more confounders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from boneaug.config import SynthConfig
from boneaug.synth.anatomy import MEAN_LENGTH, Body, Scene3D, build_scene, project_point

LesionType = Literal["geographic_sclerotic_rim", "geographic", "ill_defined", "mixed"]
LESION_TYPES: tuple[str, ...] = ("geographic_sclerotic_rim", "geographic", "ill_defined", "mixed")
CONFOUNDERS: tuple[str, ...] = ("hardware", "external_object", "deformity")
BODY_PART_INDEX = {"humerus": 0, "tibia": 1, "femur": 2, "fracture": 3}


@dataclass(frozen=True)
class LesionSpec:
    """A bone lesion on the main shaft, in bone-relative terms (the same lesion in every view)."""

    lesion_type: str
    region: str  # "metaphyseal" | "diaphyseal"
    u: float  # axial position on the shaft, 0 proximal .. 1 distal
    ecc: float  # centre offset / local bone radius (0 = central)
    angle_deg: float  # direction of the offset in the cross-section (0 lateral, 90 anterior)
    width_frac: float  # lesion diameter / local bone diameter (0.10 .. 0.75)
    elong: float  # length along the bone axis / diameter
    conspicuity: float  # 0 subtle .. 1 obvious: drives size, bone destruction, rim
    destroy: float  # share of bone removed inside the lesion
    rim_mm: float  # sclerotic rim thickness (0 = none)
    rim_density: float  # rim density as a share of cortical bone
    matrix: float  # sclerotic matrix in mixed lesions (0 = none)
    expansile: bool  # cortex bulges outward with a thin bony shell
    seed: int


@dataclass(frozen=True)
class HardwareSpec:
    """Fixation hardware: a plate with screws, an intramedullary nail, or a hip screw (femur)."""

    kind: str  # "plate" | "nail" | "hip_screw"
    u0: float
    u1: float
    side_deg: float  # plate side in the cross-section (0 lateral, 90 anterior)
    screws: tuple[float, ...]  # axial positions of screws


@dataclass(frozen=True)
class ObjectSpec:
    """An external object in the frame (image-space mm from the frame centre)."""

    kind: str  # "ring" | "snap" | "coin" | "marker" | "pin"
    x_mm: float
    y_mm: float
    size_mm: float
    tilt_deg: float
    letter: str = ""


@dataclass(frozen=True)
class FractureSpec:
    """A shaft fracture: plane obliquity, displacement and angulation of the distal fragment."""

    u: float
    tilt_x_deg: float  # obliquity of the fracture plane seen in AP
    tilt_y_deg: float  # ... and in the lateral
    shift_x_mm: float  # lateral displacement of the distal fragment
    shift_y_mm: float  # anterior displacement
    shorten_mm: float  # overlap along the axis
    angle_x_deg: float  # angulation seen in AP
    angle_y_deg: float  # angulation seen in the lateral
    gap_mm: float


@dataclass(frozen=True)
class PatientSpec:
    body_part: str
    patient_id: str
    body: Body
    sex: str
    age: int
    laterality: str  # "L" | "R"
    bone_density: float  # trabecular density scale (< 1 osteopenic)
    lesion: LesionSpec | None = None
    hardware: HardwareSpec | None = None
    external_objects: bool = False
    fracture: FractureSpec | None = None
    seed: int = 0

    @property
    def confounders(self) -> tuple[str, ...]:
        out = []
        if self.hardware is not None:
            out.append("hardware")
        if self.external_objects:
            out.append("external_object")
        if self.body.bow_mm != 0.0 or self.body.kink_deg != 0.0:
            out.append("deformity")
        return tuple(out)


@dataclass(frozen=True)
class ExposureSpec:
    """Acquisition and processing: dose, beam quality, heel effect, scatter, detector, window."""

    counts: float  # photons per mm^2 behind the median soft-tissue path (x pixel area per pixel)
    kappa: float  # bone/soft contrast scale (beam quality)
    heel: float  # relative intensity change top -> bottom
    scatter: float  # scatter-to-primary ratio scale
    sharpness: float  # 0 = [1,2,1] blur fully applied .. 1 = none
    equalise: float  # unsharp-mask dynamic-range compression (0 = none)
    top: float  # stored value of the densest bone
    offset: float  # stored value of air
    win_lo: float  # window low as a share of the median soft-tissue signal
    win_hi: float  # window high as a share of the densest bone signal
    collimation: tuple[float, float, float, float] | None = None  # open field, frame fractions


@dataclass(frozen=True)
class ImageSpec:
    patient: PatientSpec
    height: int
    width: int
    view: str  # "AP" | "LAT"
    omega_deg: float  # rotation about the long axis (0 AP, 90 lateral)
    spacing_mm: float
    s_c: float  # bone point at the frame centre
    t_c: float
    rotation_deg: float
    mirror: bool
    exposure: ExposureSpec
    objects: tuple[ObjectSpec, ...] = ()
    photometric: str = "MONOCHROME2"
    modality: str = "CR"
    rescale: tuple[float, float] = (1.0, 0.0)
    bits_stored: int = 12
    study_index: int = 0
    texture_seed: int = 0
    with_lesion: bool = True  # False renders the same image without its lesion (tests, ablations)

    @property
    def body_part(self) -> str:
        return self.patient.body_part

    @property
    def confounders(self) -> tuple[str, ...]:
        return self.patient.confounders

    def without_lesion(self) -> ImageSpec:
        return replace(self, with_lesion=False)


@dataclass(frozen=True)
class Variation:
    """How heterogeneous the views of one body part are."""

    view_jitter_deg: float
    oblique_p: float
    rotation_sd_deg: float
    rotation_max_deg: float
    framing: dict[str, float] = field(default_factory=dict)
    full_zoom: tuple[float, float] = (1.05, 1.25)
    crop_zoom: tuple[float, float] = (0.55, 0.8)
    shift_sd: float = 0.05
    collimation_p: float = 0.1
    counts: tuple[float, float] = (8000.0, 25000.0)  # photons / mm^2, log-uniform


VARIATION: dict[str, Variation] = {
    "humerus": Variation(4.0, 0.0, 2.5, 7.0, {"full": 0.86, "proximal": 0.07, "distal": 0.07},
                         (1.1, 1.28), (0.7, 0.85), 0.04, 0.03, (8000.0, 25000.0)),
    "tibia": Variation(12.0, 0.15, 6.0, 22.0,
                       {"full": 0.5, "proximal": 0.21, "distal": 0.21, "mid": 0.08},
                       (1.02, 1.35), (0.45, 0.8), 0.10, 0.12, (3000.0, 30000.0)),
    "femur": Variation(12.0, 0.15, 6.0, 22.0,
                       {"full": 0.45, "proximal": 0.25, "distal": 0.24, "mid": 0.06},
                       (1.02, 1.3), (0.45, 0.8), 0.10, 0.12, (3000.0, 30000.0)),
}


# ------------------------------------------------------------------------------------ patients

def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_body(body_part: str, rng: np.random.Generator, *, deformity: bool = False) -> Body:
    size = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.17))
    length = MEAN_LENGTH[body_part] * size * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))
    soft = float(np.clip(rng.lognormal(0.0, 0.13), 0.75, 1.45))
    fat = float(np.clip(rng.normal(6.0, 2.5), 2.0, 14.0)) * soft
    shape = tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=8))
    bow = bow_dir = kink = 0.0
    kink_u = 0.5
    if deformity:
        bow_dir = _u(rng, 0.0, 360.0)
        if rng.random() < 0.6:
            bow = _u(rng, 14.0, 34.0) * size
        else:
            kink = _u(rng, 9.0, 22.0)
            kink_u = _u(rng, 0.3, 0.7)
    return Body(length=length, size=size, canal=_u(rng, 0.42, 0.58), soft=soft, fat_mm=fat,
                shape=shape, bow_mm=bow, bow_dir_deg=bow_dir, kink_deg=kink, kink_u=kink_u)


def sample_lesion(body_part: str, rng: np.random.Generator, *,
                  conspicuity: float | None = None,
                  conspicuity_range: tuple[float, float] = (0.0, 1.0)) -> LesionSpec:
    """A lesion whose conspicuity (0 subtle .. 1 obvious; drawn uniformly in
    `conspicuity_range` unless given) drives its size, lysis and rim.

    Subtle lesions are small, partly lytic, without a rim and usually metaphyseal, where they
    sit over dense trabecular bone; obvious ones are large, fully lytic, often rimmed or expansile.
    """
    c = float(rng.uniform(*conspicuity_range)) if conspicuity is None else float(conspicuity)
    kind = str(rng.choice(LESION_TYPES, p=[0.40, 0.25, 0.20, 0.15]))
    region = "metaphyseal" if rng.random() < 0.75 - 0.35 * c else "diaphyseal"
    width = float(np.clip(0.10 + 0.65 * (0.65 * c + 0.35 * rng.random()), 0.10, 0.75))
    destroy = float(np.clip(0.10 + 0.85 * c ** 0.9 + rng.normal(0.0, 0.05), 0.07, 1.0))
    central = rng.random() < 0.4
    ecc = 0.0 if central else _u(rng, 0.25, 0.65)
    expansile = width > 0.45 and not central and rng.random() < 0.5
    if not expansile:  # keep the lesion inside the bone outline
        ecc = min(ecc, max(0.0, 0.92 - width))
    rim_mm = rim_density = matrix = 0.0
    if kind == "geographic_sclerotic_rim" or (kind == "mixed" and rng.random() < 0.5) or expansile:
        rim_mm = _u(rng, 0.8, 2.5)
        rim_density = float(np.clip(0.15 + 0.55 * c + rng.normal(0, 0.08), 0.1, 0.8))
    if kind == "mixed":
        matrix = _u(rng, 0.25, 0.6) * (0.3 + 0.7 * c)
    elong = _u(rng, 1.3, 2.4) if kind == "ill_defined" else _u(rng, 1.1, 2.0)
    return LesionSpec(
        lesion_type=kind, region=region, u=0.0, ecc=ecc, angle_deg=_u(rng, 0.0, 360.0),
        width_frac=width, elong=elong, conspicuity=c, destroy=destroy, rim_mm=rim_mm,
        rim_density=rim_density, matrix=matrix, expansile=expansile,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _diaphyseal_size(lesion: LesionSpec, canal: float, rng: np.random.Generator) -> LesionSpec:
    """In the diaphysis a lytic lesion shows by what it does to the cortex: one inside the fatty
    marrow canal is occult, one wider than the canal scallops and thins the cortex. So the size
    follows conspicuity relative to this patient's canal (0.6x canal when subtle .. 1.5x)."""
    c = lesion.conspicuity
    width = float(np.clip(canal * (0.6 + 0.9 * c) + rng.normal(0.0, 0.03), 0.10, 0.75))
    expansile = lesion.expansile and width > 0.45
    ecc = lesion.ecc if expansile else min(lesion.ecc, max(0.0, 0.92 - width))
    return replace(lesion, width_frac=width, expansile=expansile, ecc=ecc)


def _metaphyseal_reach(lesion: LesionSpec, scene: Scene3D) -> LesionSpec:
    """An obvious metaphyseal lesion reaches the cortex and thins it (up to 60 % at c = 1):
    set the eccentricity so that the lesion's edge lies that far into the cortex."""
    _, rx, ry, inner = scene.shaft.at(lesion.u)
    _, mx, my, _ = scene.shaft.at(0.5)
    r = 0.5 * (rx + ry)
    semi = lesion.width_frac * min(r, 1.5 * 0.5 * (mx + my))
    edge = r * inner + 0.6 * lesion.conspicuity * r * (1.0 - inner)
    return replace(lesion, ecc=float(np.clip((edge - semi) / r, 0.0, 0.85)))


def _place_lesion(lesion: LesionSpec, zones: dict[str, tuple[tuple[float, float], ...]],
                  rng: np.random.Generator) -> LesionSpec:
    spans = zones[lesion.region]
    weights = np.array([b - a for a, b in spans])
    lo, hi = spans[int(rng.choice(len(spans), p=weights / weights.sum()))]
    return replace(lesion, u=_u(rng, lo, hi))


def sample_hardware(body_part: str, rng: np.random.Generator) -> HardwareSpec:
    kinds = ["plate", "nail"] + (["hip_screw"] if body_part == "femur" else [])
    kind = str(rng.choice(kinds))
    if kind == "nail":
        u0, u1 = _u(rng, 0.03, 0.08), _u(rng, 0.85, 0.93)
        screws = (u0 + 0.05, u0 + 0.09, u1 - 0.08, u1 - 0.04)
        return HardwareSpec("nail", u0, u1, 0.0, screws)
    if kind == "hip_screw":
        u0, u1 = 0.12, _u(rng, 0.28, 0.4)
        n = int(rng.integers(2, 5))
        return HardwareSpec("hip_screw", u0, u1, 0.0, tuple(np.linspace(u0 + 0.05, u1 - 0.03, n)))
    length = _u(rng, 0.22, 0.45)
    u0 = _u(rng, 0.06, 0.94 - length)
    n = int(rng.integers(4, 9))
    screws = tuple(float(v) for v in np.linspace(u0 + 0.02, u0 + length - 0.02, n))
    side = float(rng.choice([0.0, 90.0, 180.0], p=[0.6, 0.25, 0.15])) + _u(rng, -15, 15)
    return HardwareSpec("plate", u0, u0 + length, side, screws)


def sample_fracture(rng: np.random.Generator) -> FractureSpec:
    displaced = rng.random() < 0.65
    k = 1.0 if displaced else 0.0
    return FractureSpec(
        u=_u(rng, 0.2, 0.8),
        tilt_x_deg=float(rng.choice([0.0, 1.0]) * rng.uniform(-55, 55)),
        tilt_y_deg=float(rng.uniform(-30, 30)),
        shift_x_mm=k * float(rng.normal(0, 9)),
        shift_y_mm=k * float(rng.normal(0, 9)),
        shorten_mm=k * float(rng.normal(1.5, 5)),  # > 0 overlapping (dense band), < 0 distracted
        angle_x_deg=k * float(rng.normal(0, 8)),
        angle_y_deg=k * float(rng.normal(0, 8)),
        gap_mm=_u(rng, 0.6, 2.5) if displaced else _u(rng, 0.4, 1.2),
    )


def sample_patient(
    body_part: str,
    rng: np.random.Generator,
    *,
    patient_id: str = "SYN-00000",
    lesion: bool = False,
    confounders: tuple[str, ...] = (),
    fracture: bool = False,
    conspicuity: float | None = None,
    conspicuity_range: tuple[float, float] = (0.0, 1.0),
) -> PatientSpec:
    """A synthetic person with one long bone of `body_part` and what it carries."""
    unknown = set(confounders) - set(CONFOUNDERS)
    if unknown:
        raise ValueError(
            f"unknown confounders {sorted(unknown)}; expected a subset of {CONFOUNDERS}")
    if body_part not in MEAN_LENGTH:
        raise ValueError(f"unknown body part {body_part!r}; expected one of {sorted(MEAN_LENGTH)}")
    body = sample_body(body_part, rng, deformity="deformity" in confounders)
    les = None
    if lesion:
        les = sample_lesion(body_part, rng, conspicuity=conspicuity,
                            conspicuity_range=conspicuity_range)
        les = _place_lesion(les, build_scene(body_part, body, 0.0).lesion_zones, rng)
        if les.region == "diaphyseal":
            les = _diaphyseal_size(les, body.canal, rng)
        elif les.conspicuity > 0.4 and rng.random() < 0.8:
            les = _metaphyseal_reach(les, build_scene(body_part, body, 0.0))
    hardware = sample_hardware(body_part, rng) if "hardware" in confounders else None
    return PatientSpec(
        body_part=body_part, patient_id=patient_id, body=body,
        sex=str(rng.choice(["F", "M"])), age=int(rng.integers(18, 86)),
        laterality=str(rng.choice(["L", "R"])),
        bone_density=_u(rng, 0.75, 1.2),
        lesion=les, hardware=hardware, external_objects="external_object" in confounders,
        fracture=sample_fracture(rng) if fracture else None,
        seed=int(rng.integers(0, 2**31 - 1)),
    )


# ------------------------------------------------------------------------------------ images

def _framing(var: Variation, length: float, rng: np.random.Generator) -> tuple[float, float]:
    """(visible length along the bone in mm, bone s at the frame centre)."""
    modes = list(var.framing)
    mode = str(rng.choice(modes, p=np.array([var.framing[m] for m in modes])))
    if mode == "full":
        visible = length * _u(rng, *var.full_zoom)
        return visible, length / 2 + rng.normal(0, 0.03) * length
    visible = length * _u(rng, *var.crop_zoom)
    if mode == "proximal":
        return visible, visible / 2 - _u(rng, 0.05, 0.2) * visible
    if mode == "distal":
        return visible, length - visible / 2 + _u(rng, 0.05, 0.2) * visible
    return visible, length / 2 + rng.normal(0, 0.08) * length


OBJECT_KINDS = {  # kind: (probability, size range in mm)
    "ring": (0.25, (16, 26)), "snap": (0.25, (9, 15)), "coin": (0.15, (17, 27)),
    "marker": (0.2, (14, 24)), "pin": (0.15, (25, 45)),
}


def _objects(rng: np.random.Generator, frame_h: float, frame_w: float,
             t_axis: float) -> tuple[ObjectSpec, ...]:
    out = []
    for i in range(int(rng.integers(1, 4))):
        kinds = list(OBJECT_KINDS)
        kind = str(rng.choice(kinds, p=[OBJECT_KINDS[k][0] for k in kinds]))
        size = OBJECT_KINDS[kind][1]
        # the first object lies over the limb, the others anywhere
        x = t_axis + rng.normal(0, 25) if i == 0 else _u(rng, -0.42, 0.42) * frame_w
        y = _u(rng, -0.42, 0.42) * frame_h
        out.append(ObjectSpec(kind, float(x), float(y), _u(rng, *size), _u(rng, 0, 180),
                              str(rng.choice(["L", "R"])) if kind == "marker" else ""))
    return tuple(out)


def _exposure(body_part: str, var: Variation, rng: np.random.Generator) -> ExposureSpec:
    colli = None
    if rng.random() < var.collimation_p:
        colli = (_u(rng, 0.0, 0.12), _u(rng, 0.0, 0.06), _u(rng, 0.88, 1.0), _u(rng, 0.94, 1.0))
    return ExposureSpec(
        counts=float(np.exp(rng.uniform(np.log(var.counts[0]), np.log(var.counts[1])))),
        kappa=_u(rng, 0.85, 1.15),
        heel=_u(rng, -0.15, 0.15),
        scatter=_u(rng, 0.1, 0.5),
        sharpness=_u(rng, 0.0, 0.6),
        equalise=_u(rng, 0.35, 0.7),
        top=_u(rng, 2700.0, 3700.0),
        offset=_u(rng, 40.0, 300.0),
        win_lo=_u(rng, 0.25, 0.55),
        win_hi=_u(rng, 0.97, 1.1),
        collimation=colli,
    )


def lesion_centre(lesion: LesionSpec, scene: Scene3D, omega_deg: float) -> tuple[float, float]:
    """The lesion centre in projected bone coordinates (s, t), mm: the point framing keeps in
    view and `lesions.lesion_geometry` centres the lesion on."""
    (s, x, y), rx, ry, _ = scene.shaft.at(lesion.u)
    a = math.radians(lesion.angle_deg)
    p = (s, x + lesion.ecc * rx * math.cos(a), y + lesion.ecc * ry * math.sin(a))
    ps, pt, _ = project_point(p, omega_deg)
    return ps, pt


def focus_point(patient: PatientSpec, omega_deg: float) -> tuple[float, float] | None:
    """What must be in the frame, in projected bone coordinates (s, t): the lesion centre, or
    the fracture site; None for an image without either."""
    les, fx = patient.lesion, patient.fracture
    if les is None and fx is None:
        return None
    scene = build_scene(patient.body_part, patient.body, omega_deg)
    if les is not None:
        return lesion_centre(les, scene, omega_deg)
    assert fx is not None
    p, *_ = scene.shaft.at(fx.u)
    ps, pt, _ = project_point(p, omega_deg)
    return ps, pt


@dataclass(frozen=True)
class Frame:
    """A stored image's framing of the bone: the frame centre shows bone point (s_c, t_c) in mm,
    the bone axis is turned by `rotation_deg`, `mirror` flips t; `spacing_mm` per pixel of the
    (height, width) image."""

    s_c: float
    t_c: float
    rotation_deg: float
    mirror: bool
    spacing_mm: float
    height: int
    width: int


def bone_to_pixel(s: float, t: float, frame: Frame) -> tuple[float, float]:
    """Stored-image pixel coordinates (px = column, py = row; pixel i spans [i, i + 1)) of the
    projected bone point (s, t) in mm under `frame`.

    The one place that maps bone coordinates to stored pixels outside the renderer: framing
    (`sample_image`) and lesion placement on a stored image (`phantom`) must agree with each
    other and with `raster.Placement`, which the renderer uses on its working grid.
    """
    th = math.radians(frame.rotation_deg)
    ds, dt = s - frame.s_c, (t - frame.t_c) * (-1 if frame.mirror else 1)
    px = frame.width / 2 + (ds * math.sin(th) + dt * math.cos(th)) / frame.spacing_mm
    py = frame.height / 2 + (ds * math.cos(th) - dt * math.sin(th)) / frame.spacing_mm
    return px, py


def image_pixel(spec: ImageSpec, s: float, t: float) -> tuple[float, float]:
    """`bone_to_pixel` with the framing of a sampled image."""
    return bone_to_pixel(s, t, Frame(spec.s_c, spec.t_c, spec.rotation_deg, spec.mirror,
                                     spec.spacing_mm, spec.height, spec.width))


def sample_image(
    patient: PatientSpec,
    config: SynthConfig,
    rng: np.random.Generator,
    *,
    study_index: int = 0,
    view: str | None = None,
) -> ImageSpec:
    """One radiograph of `patient`: view, framing, exposure and encoding vary per image."""
    var = VARIATION[patient.body_part]
    if view is None:
        view = "AP" if rng.random() < 0.55 else "LAT"
    omega = 0.0 if view == "AP" else 90.0
    if rng.random() < var.oblique_p:
        omega = 45.0 + rng.normal(0, 12) * (1 if view == "AP" else -1)
    omega += rng.normal(0, var.view_jitter_deg)
    view = "AP" if abs(((omega + 90) % 180) - 90) < 45 else "LAT"
    length = patient.body.length
    height, width = config.height, config.width
    limit = var.rotation_max_deg
    rotation = float(np.clip(rng.normal(0, var.rotation_sd_deg), -limit, limit))
    mirror = bool(rng.random() < 0.5)
    target = focus_point(patient, omega)
    for attempt in range(40):
        visible, s_c = _framing(var, length, rng)
        if attempt >= 20:  # could not frame the lesion by chance: show the whole bone
            visible, s_c = length * var.full_zoom[1], length / 2
        spacing = visible / height
        t_c = rng.normal(0, var.shift_sd) * width * spacing
        if target is None:
            break
        # the lesion centre / fracture site must project well inside the frame
        px, py = bone_to_pixel(*target, Frame(s_c, t_c, rotation, mirror, spacing, height, width))
        if 0.12 * width < px < 0.88 * width and 0.1 * height < py < 0.9 * height:
            break
    exposure = _exposure(patient.body_part, var, rng)
    objects = ()
    if patient.external_objects:
        objects = _objects(rng, height * spacing, width * spacing, -t_c * (-1 if mirror else 1))
    photometric = "MONOCHROME1" if rng.random() < config.monochrome1_fraction else "MONOCHROME2"
    rescale = (1.0, 0.0)
    if rng.random() < 0.25:
        choices = [(1.0, -1024.0), (0.5, 0.0), (2.0, -4096.0), (1.0, 100.0)]
        rescale = choices[int(rng.integers(0, len(choices)))]
    return ImageSpec(
        patient=patient, height=height, width=width, view=view, omega_deg=float(omega),
        spacing_mm=float(spacing), s_c=float(s_c), t_c=float(t_c), rotation_deg=rotation,
        mirror=mirror, exposure=exposure, objects=objects, photometric=photometric,
        modality=str(rng.choice(["CR", "DX"])), rescale=rescale, bits_stored=config.bits_stored,
        study_index=study_index, texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_spec(
    body_part: str,
    config: SynthConfig,
    rng: np.random.Generator,
    *,
    lesion: bool = False,
    confounders: tuple[str, ...] = (),
    fracture: bool = False,
    conspicuity: float | None = None,
    view: str | None = None,
) -> ImageSpec:
    """A complete image spec: a new patient and one radiograph of them."""
    patient = sample_patient(body_part, rng, lesion=lesion, confounders=confounders,
                             fracture=fracture, conspicuity=conspicuity)
    return sample_image(patient, config, rng, view=view)
