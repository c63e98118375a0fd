"""3D anatomy of the humerus, the tibia with its fibula, and the femur, as convex primitives.

Bone-local 3D coordinates, in mm: s runs along the main bone from its proximal joint surface
(distal positive), x is lateral (+) / medial (-), y is anterior (+) / posterior (-). A view turns
the limb about its long axis by omega (0 = AP, 90 = lateral) and projects along the depth axis:
t = x cos(omega) + y sin(omega). Elliptical cross-sections project exactly: half-width
sqrt((rx cos)^2 + (ry sin)^2) and central chord 2 rx ry / half-width. So one 3D model gives the
AP silhouette, the lateral one (fibula behind the tibia, patella in front of the knee, anterior
femoral bow) and every oblique in between.

Dimensions are adult means (humerus ~315 mm, femur ~450 mm, tibia ~370 mm; heads ~46 mm;
mid-shaft diameters 22 / 28 / 25 mm; canal/bone width ratio `canal` ~0.42-0.58 at the
diaphysis, cortex thinning to a shell at the metaphyses) scaled per patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from boneaug.synth.raster import Ellipsoid2D, Tube2D

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Tube3D:
    """A tube from p0 to p1 with elliptical cross-sections (rx lateral, ry anterior) at knots."""

    p0: Vec3
    p1: Vec3
    knots: tuple[float, ...]
    rx: tuple[float, ...]
    ry: tuple[float, ...]
    inner: tuple[float, ...]
    trab: tuple[float, ...]
    offx: tuple[float, ...]
    offy: tuple[float, ...]
    cap: float = 0.0

    def at(self, u: float) -> tuple[Vec3, float, float, float]:
        """(centre (s, x, y), rx, ry, inner ratio) at axial fraction u."""
        k = np.asarray(self.knots)
        p = [self.p0[i] + u * (self.p1[i] - self.p0[i]) for i in range(3)]
        p[1] += float(np.interp(u, k, self.offx))
        p[2] += float(np.interp(u, k, self.offy))
        rx, ry = float(np.interp(u, k, self.rx)), float(np.interp(u, k, self.ry))
        return (p[0], p[1], p[2]), rx, ry, float(np.interp(u, k, self.inner))


@dataclass(frozen=True)
class Ellipsoid3D:
    """An axis-aligned ellipsoid (semi-axes along s, x, y) with a cortical shell `shell` mm."""

    centre: Vec3
    semi: Vec3
    shell: float = 1.5
    trab: float = 1.0
    tilt_deg: float = 0.0  # in-plane turn after projection
    density: float = 1.0  # soft-tissue blobs only: attenuation relative to muscle (lung < 1)


@dataclass(frozen=True)
class Bone3D:
    name: str
    tubes: tuple[Tube3D, ...] = ()
    ellipsoids: tuple[Ellipsoid3D, ...] = ()
    holes: tuple[tuple[Ellipsoid3D, float], ...] = ()  # (ellipsoid, share of bone removed)


@dataclass(frozen=True)
class Scene3D:
    """Everything in a radiograph of one limb: main bone first, neighbours, soft tissue."""

    bones: tuple[Bone3D, ...]
    shaft: Tube3D  # the main bone's shaft: lesions, hardware and fractures are placed on it
    soft_tubes: tuple[Tube3D, ...]
    soft_blobs: tuple[Ellipsoid3D, ...]
    fat_mm: float
    length: float
    lesion_zones: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Body:
    """Per-patient anatomy parameters (shared by all images of one synthetic person)."""

    length: float  # main bone length, mm
    size: float  # width scale (~1)
    canal: float  # canal / bone width at the diaphysis
    soft: float  # soft-tissue thickness scale
    fat_mm: float
    shape: tuple[float, ...]  # body-part specific jitters in [-1, 1]
    bow_mm: float = 0.0  # deformity: extra bowing of the shaft
    bow_dir_deg: float = 0.0
    kink_deg: float = 0.0  # deformity: angulated malunion at kink_u
    kink_u: float = 0.5


# ------------------------------------------------------------------------------------ helpers

def _tube(rows: Sequence[Sequence[float]], x0: float = 0.0, y0: float = 0.0, cap: float = 0.0,
          bow: tuple[float, float] = (0.0, 0.0)) -> Tube3D:
    """A shaft along s from rows of (s, rx, ry, inner, trab, offx, offy); bow adds sin(pi u)."""
    arr = np.asarray(rows, dtype=np.float64)
    s0, s1 = float(arr[0, 0]), float(arr[-1, 0])
    u = (arr[:, 0] - s0) / (s1 - s0)
    bump = np.sin(np.pi * u)
    return Tube3D(
        p0=(s0, x0, y0), p1=(s1, x0, y0), knots=tuple(u), rx=tuple(arr[:, 1]), ry=tuple(arr[:, 2]),
        inner=tuple(arr[:, 3]), trab=tuple(arr[:, 4]),
        offx=tuple(arr[:, 5] + bow[0] * bump), offy=tuple(arr[:, 6] + bow[1] * bump), cap=cap,
    )


def rod(p0: Vec3, p1: Vec3, r0: float, r1: float | None = None, *, inner: float = 0.0,
        trab: float = 0.0, cap: float = 0.0, mid: float | None = None) -> Tube3D:
    """A circular tube from p0 to p1 (radius r0 -> r1, optional waist `mid` at the middle)."""
    r1 = r0 if r1 is None else r1
    if mid is None:
        knots, radii = (0.0, 1.0), (r0, r1)
    else:
        knots, radii = (0.0, 0.5, 1.0), (r0, mid, r1)
    n = len(knots)
    return Tube3D(p0=p0, p1=p1, knots=knots, rx=radii, ry=radii, inner=(inner,) * n,
                  trab=(trab,) * n, offx=(0.0,) * n, offy=(0.0,) * n, cap=cap)


def _scale_rows(rows: list[list[float]], size: float) -> list[list[float]]:
    """Rows for a reference bone (s in mm as given): radii and offsets are multiplied by `size`."""
    return [[s, rx * size, ry * size, inner, trab, ox * size, oy * size]
            for s, rx, ry, inner, trab, ox, oy in rows]


def _deform(body: Body) -> tuple[float, float]:
    d = math.radians(body.bow_dir_deg)
    return body.bow_mm * math.cos(d), body.bow_mm * math.sin(d)


def _kinked(tube: Tube3D, body: Body) -> Tube3D:
    """Angulated malunion: the shaft beyond kink_u deviates by kink_deg, with a callus bulge."""
    if body.kink_deg == 0.0:
        return tube
    d = math.radians(body.bow_dir_deg)
    length = tube.p1[0] - tube.p0[0]
    ku = body.kink_u
    knots = np.union1d(np.asarray(tube.knots), [ku - 0.04, ku, ku + 0.04])
    tan = math.tan(math.radians(body.kink_deg))
    dev = np.maximum(knots - body.kink_u, 0.0) * length * tan
    callus = 1.0 + 0.18 * np.exp(-(((knots - body.kink_u) / 0.05) ** 2))
    k = np.asarray(tube.knots)

    def interp(values: tuple[float, ...]) -> np.ndarray:
        return np.interp(knots, k, np.asarray(values))

    return Tube3D(
        p0=tube.p0, p1=tube.p1, knots=tuple(knots), rx=tuple(interp(tube.rx) * callus),
        ry=tuple(interp(tube.ry) * callus), inner=tuple(interp(tube.inner) / callus),
        trab=tuple(interp(tube.trab)), offx=tuple(interp(tube.offx) + dev * math.cos(d)),
        offy=tuple(interp(tube.offy) + dev * math.sin(d)), cap=tube.cap,
    )


SHELL = 0.6  # epiphyseal / subchondral cortex is thin: reference shells below are scaled by this


def _ell(c: Vec3, semi: Vec3, size: float, shell: float = 1.5, trab: float = 1.0,
         tilt: float = 0.0) -> Ellipsoid3D:
    """Ellipsoid: centre s in final mm; centre x/y, semi-axes, shell in reference mm x size."""
    scaled = (semi[0] * size, semi[1] * size, semi[2] * size)
    return Ellipsoid3D(centre=(c[0], c[1] * size, c[2] * size), semi=scaled,
                       shell=shell * size * SHELL, trab=trab, tilt_deg=tilt)


def _world(e: Ellipsoid3D, view_deg: float) -> Ellipsoid3D:
    """An ellipsoid that stays put while the limb turns (trunk, shoulder girdle, pelvis in a
    frog-leg lateral): it projects as in the AP view whatever the limb's view angle."""
    w = math.radians(view_deg)
    s, x, y = e.centre
    xr, yr = x * math.cos(w) - y * math.sin(w), x * math.sin(w) + y * math.cos(w)
    a_s, a_x, a_y = e.semi
    semi = (a_s, a_y, a_x) if abs(math.sin(w)) > math.sqrt(0.5) else e.semi
    return replace(e, centre=(s, xr, yr), semi=semi)


def _world_rod(t: Tube3D, view_deg: float) -> Tube3D:
    w = math.radians(view_deg)

    def turn(p: Vec3) -> Vec3:
        c, s = math.cos(w), math.sin(w)
        return (p[0], p[1] * c - p[2] * s, p[1] * s + p[2] * c)

    return replace(t, p0=turn(t.p0), p1=turn(t.p1))


# ------------------------------------------------------------------------------------ humerus

def humerus(body: Body, view_deg: float) -> Scene3D:
    L, g, q = body.length, body.size, body.canal
    j = body.shape + (0.0,) * 8
    bow = _deform(body)
    head_r = 23.0 * (1 + 0.06 * j[0])
    rows = [
        [14 * g, 17, 18, 0.9, 1.0, 9, 2],  # top of the greater tuberosity, domed by the cap
        [30 * g, 24, 22, 0.88, 1.0, 5, 1],
        [55 * g, 17, 16, 0.8, 0.9, 1, 0],  # surgical neck
        [0.27 * L, 12.5, 12.5, 0.62, 0.3, 1, 0],
        [0.40 * L, 11.5, 11.2, q, 0.0, 1.5, 0],  # deltoid tuberosity level
        [0.62 * L, 11.0, 10.6, q, 0.0, 0.5, 0.5],
        [0.76 * L, 13.5, 10.8, 0.62, 0.2, 0, 1.5],
        [0.86 * L, 21.0, 11.0, 0.74, 0.8, -1, 3],  # supracondylar ridges: wide and flat
        [0.92 * L, 28.5, 12.5, 0.82, 1.0, -2, 6],
        [L - 14 * g, 27.0, 14.0, 0.86, 1.0, -2, 8],
        [L - 4 * g, 21.0, 14.0, 0.86, 1.0, -1, 9],
    ]
    shaft = _kinked(_tube(_scale_rows(rows, g), cap=14 * g, bow=bow), body)
    distal = L - 12 * g
    ends = (
        _ell(((head_r + 4) * g, -15, -4), (head_r, head_r * 0.95, head_r), g, 1.2, tilt=-20),
        _ell((32 * g, 3, 15), (10, 8, 8), g, 0.8),  # lesser tuberosity
        _ell((distal, -11, 8), (11, 12, 14), g, 1.0),  # trochlea
        _ell((distal - 2 * g, 12, 10), (10, 10, 11), g, 1.0),  # capitulum
        _ell((L - 30 * g, -26 - 2 * j[1], -2), (10, 9, 7), g, 0.8),  # medial epicondyle
    )
    holes = ((_ell((L - 30 * g, -1, -4), (13, 9, 9), g, 0.0), 0.8),)  # olecranon fossa
    main = Bone3D("humerus", (shaft,), ends, holes)

    # shoulder girdle (stays put: the lateral humerus is taken with the arm turned)
    girdle = [
        _ell(((head_r + 4) * g, -41, -8), (19, 4, 14), g, 1.4, trab=0.6),  # glenoid rim
        _ell((-10 * g, 0, -8), (7, 26, 11), g, 1.2),  # acromion
        _ell((85 * g, -88, -25), (75, 26, 5), g, 1.0, trab=0.5, tilt=-12),  # scapular blade
    ]
    clavicle = rod((-22 * g, 10 * g, 4 * g), (-4 * g, -150 * g, 26 * g), 7 * g, 8 * g, inner=0.6,
                   trab=0.5, cap=7 * g)
    shoulder = Bone3D("shoulder", (_world_rod(clavicle, view_deg),),
                      tuple(_world(e, view_deg) for e in girdle))

    # forearm: extended for the AP, flexed ~90 deg (pointing anterior) for the lateral
    flex = math.radians(min(max(view_deg, 0.0), 90.0) * (0.95 + 0.1 * j[2]))
    fwd = (math.cos(flex), 0.0, math.sin(flex))  # direction in (s, x, y)

    def along(base: Vec3, dist: float, lateral: float) -> Vec3:
        return (base[0] + fwd[0] * dist, base[1] + lateral, base[2] + fwd[2] * dist)

    elbow = (distal + 4 * g, 0.0, 0.0)
    radius = rod(along(elbow, 6 * g, 13 * g), along(elbow, 190 * g, 22 * g), 11 * g, 10 * g,
                 inner=0.55, trab=0.3, mid=7 * g, cap=5 * g)
    ulna = rod(along(elbow, -6 * g, -8 * g), along(elbow, 200 * g, -13 * g), 12 * g, 6 * g,
               inner=0.5, trab=0.3, mid=8 * g, cap=10 * g)
    forearm = Bone3D("forearm", (radius, ulna), ())

    arm = _tube(_scale_rows([
        [-80 * g, 48, 44, 0, 0, 2, -4],
        [10 * g, 55, 50, 0, 0, 4, -2],  # deltoid
        [0.35 * L, 44 * body.soft, 46 * body.soft, 0, 0, 0, 3],
        [0.75 * L, 40 * body.soft, 40 * body.soft, 0, 0, 0, 2],
        [L + 10 * g, 38, 36, 0, 0, 0, 0],
    ], g), bow=(bow[0] * 0.5, bow[1] * 0.5))
    fore_soft = rod(along(elbow, -30 * g, 0.0), along(elbow, 260 * g, 0.0), 37 * g * body.soft,
                    30 * g * body.soft, cap=40 * g)
    # chest wall + lung: a large but not very attenuating volume beside the shoulder
    chest = _ell((60 * g, -190, -20), (260, 100, 120), g * body.soft, 0.0, 0.0)
    trunk = replace(_world(chest, view_deg), density=0.35)
    return Scene3D(
        bones=(main, shoulder, forearm), shaft=shaft, soft_tubes=(arm, fore_soft),
        soft_blobs=(trunk,), fat_mm=body.fat_mm, length=L,
        lesion_zones={"metaphyseal": ((0.07, 0.20), (0.80, 0.90)), "diaphyseal": ((0.26, 0.74),)},
    )


# ------------------------------------------------------------------------------------ femur

def femur(body: Body, view_deg: float) -> Scene3D:
    L, g, q = body.length, body.size, body.canal
    j = body.shape + (0.0,) * 8
    bow = _deform(body)
    neck_angle = math.radians(130 + 5 * j[0])
    anteversion = math.radians(13 + 6 * j[1])
    head_r = 23.5 * g * (1 + 0.05 * j[2])
    rows = [
        [2 * g, 16, 17, 0.88, 1.0, 24, -4],  # tip of the greater trochanter
        [22 * g, 26, 24, 0.88, 1.0, 15, -3],
        [58 * g, 27, 23, 0.85, 1.0, 6, -2],  # intertrochanteric
        [95 * g, 18.5, 17, 0.72, 0.7, 1, -1],  # below the lesser trochanter
        [0.26 * L, 15.5, 15.0, 0.62, 0.3, 0, 0],
        [0.38 * L, 14.2, 14.6, q, 0.0, 0, -0.5],
        [0.66 * L, 14.0, 14.6, q, 0.0, 0, -0.5],
        [0.80 * L, 18, 16.5, 0.62, 0.3, 0, -1],
        [0.89 * L, 30, 24, 0.76, 0.9, 0, -3],
        [0.95 * L, 39, 30, 0.85, 1.0, 0, -6],
        [L - 12 * g, 39, 32, 0.86, 1.0, 0, -9],
        [L - 2 * g, 32, 30, 0.86, 1.0, 0, -10],
    ]
    shaft = _kinked(_tube(_scale_rows(rows, g), cap=16 * g, bow=(bow[0], bow[1] + 11 * g)), body)
    # neck from its base on the shaft to the head centre
    base = (58 * g, 0.0, 0.0)
    neck_len = 55 * g * (1 + 0.05 * j[3])
    head = (base[0] + neck_len * math.cos(neck_angle),
            base[1] - neck_len * math.sin(neck_angle) * math.cos(anteversion),
            base[2] + neck_len * math.sin(neck_angle) * math.sin(anteversion))
    neck = rod(base, head, 22 * g, 19 * g, inner=0.82, trab=1.0, mid=16 * g, cap=14 * g)
    head_ell = Ellipsoid3D(head, (head_r, head_r, head_r), shell=1.0 * g, trab=1.0)
    lt = _ell((80 * g, -19, -10), (12, 8, 8), g, 0.8)
    distal = L - 22 * g
    condyles = (
        _ell((distal, -20, -14), (22, 17, 27), g, 1.0),
        _ell((distal - 2 * g, 20, -12), (20, 17, 26), g, 1.0),
    )
    notch = ((_ell((L - 6 * g, 0, -22), (14, 9, 12), g, 0.0), 0.7),)
    main = Bone3D("femur", (shaft, neck), (head_ell, lt) + condyles, notch)

    # pelvis, staying AP in the (frog-leg) lateral: roof over the head, obturator ring below
    hs, hx, hy = head
    ilium = Ellipsoid3D((hs - 70 * g, hx - 20 * g, hy - 10 * g), (75 * g, 60 * g, 14 * g),
                        1.2 * g, 0.8, tilt_deg=-20)
    pubis = Ellipsoid3D((hs + 48 * g, hx - 45 * g, hy + 12 * g), (44 * g, 30 * g, 14 * g),
                        1.2 * g, 0.8)
    obturator = (Ellipsoid3D((hs + 50 * g, hx - 46 * g, hy + 12 * g),
                             (28 * g, 17 * g, 20 * g), 0.0), 1.0)
    pelvis = Bone3D("pelvis", (), tuple(_world(e, view_deg) for e in (ilium, pubis)),
                    ((_world(obturator[0], view_deg), obturator[1]),))
    # knee: patella in front of the distal femur, top of the tibia and fibula below
    patella = _ell((L - 45 * g, 3, 46 + 4 * j[4]), (21, 19, 10), g, 0.9)
    tibia_top = _tube(_scale_rows([
        [L + 6 * g, 33, 25, 0.9, 1.0, 0, -4],
        [L + 22 * g, 36, 28, 0.88, 1.0, 0, -3],
        [L + 45 * g, 29, 26, 0.82, 1.0, 0, -2],
        [L + 95 * g, 18, 18, 0.68, 0.6, 0, 0],
        [L + 300 * g, 13, 14, q, 0.0, 0, 0],
    ], g), cap=12 * g)
    fib_head = _ell((L + 32 * g, 36, -19), (12, 10, 10), g, 0.9)
    fib = rod((L + 36 * g, 35 * g, -19 * g), (L + 300 * g, 30 * g, -12 * g), 8 * g, 6.5 * g,
              inner=0.5, cap=6 * g)
    knee = Bone3D("knee", (tibia_top, fib), (patella, fib_head))

    thigh = _tube(_scale_rows([
        [-120 * g, 98, 90, 0, 0, -18, -15],
        [30 * g, 90, 86, 0, 0, -12, -12],
        [0.35 * L, 80 * body.soft, 84 * body.soft, 0, 0, -4, -8],
        [0.75 * L, 64 * body.soft, 66 * body.soft, 0, 0, 0, -4],
        [L, 55, 55, 0, 0, 0, 0],
        [L + 350 * g, 48, 55, 0, 0, 0, -10],
    ], g), bow=(bow[0] * 0.5, bow[1] * 0.5))
    buttock = _world(Ellipsoid3D((hs - 60 * g, hx - 90 * g, hy - 30 * g),
                                 (170 * g, 120 * g * body.soft, 110 * g * body.soft), 0.0, 0.0),
                     view_deg)
    return Scene3D(
        bones=(main, pelvis, knee), shaft=shaft, soft_tubes=(thigh,), soft_blobs=(buttock,),
        fat_mm=body.fat_mm, length=L,
        lesion_zones={"metaphyseal": ((0.08, 0.18), (0.80, 0.92)), "diaphyseal": ((0.24, 0.74),)},
    )


# ------------------------------------------------------------------------------------ tibia

def tibia(body: Body, view_deg: float) -> Scene3D:
    L, g, q = body.length, body.size, body.canal
    j = body.shape + (0.0,) * 8
    bow = _deform(body)
    rows = [
        [3 * g, 30, 24, 0.9, 1.0, 0, -4],
        [18 * g, 37, 29, 0.88, 1.0, 0, -3],
        [40 * g, 30, 26, 0.83, 1.0, 0, -1],
        [0.20 * L, 20, 21, 0.70, 0.7, 0, 2],
        [0.34 * L, 12.6, 15, q, 0.0, 0, 2.5],
        [0.66 * L, 12.0, 13.6, q, 0.0, 0, 1.5],
        [0.84 * L, 15.5, 16, 0.64, 0.45, 0, 0.5],
        [0.94 * L, 22, 21, 0.80, 0.95, 0, 0],
        [L - 4 * g, 24, 22.5, 0.84, 1.0, 0, 0],
    ]
    shaft = _kinked(_tube(_scale_rows(rows, g), cap=10 * g, bow=bow), body)
    ends = (
        _ell((10 * g, -17, -3), (11, 20, 25), g, 1.0),  # medial condyle
        _ell((11 * g, 17, -6), (10, 19, 23), g, 1.0),  # lateral condyle
        _ell((0 * g + 2, -5, -2), (7, 4, 6), g, 0.8),  # tibial spines
        _ell((0 * g + 2, 5, -2), (7, 4, 6), g, 0.8),
        _ell((48 * g, 4, 19), (18, 9, 8), g, 0.8),  # tuberosity
        _ell((L + 1 * g, -19 - 2 * j[0], 2), (15, 7, 11), g, 1.0),  # medial malleolus
    )
    main = Bone3D("tibia", (shaft,), ends)
    fib_x0, fib_x1 = 37 + 2 * j[1], 25 + 2 * j[2]
    fibula = Bone3D("fibula", (
        _tube(_scale_rows([
            [18 * g, 9, 9, 0.7, 1.0, fib_x0 + 1, -18],
            [30 * g, 10.5, 10, 0.65, 0.9, fib_x0, -17],
            [50 * g, 7.0, 7.5, 0.55, 0.3, fib_x0 - 1, -16],
            [0.50 * L, 6.5, 7.5, 0.5, 0.0, (fib_x0 + fib_x1) / 2 + 2, -14],
            [0.85 * L, 7.0, 8.0, 0.55, 0.2, fib_x1 + 1, -10],
            [L - 10 * g, 10.0, 10.5, 0.7, 1.0, fib_x1, -8],
            [L + 16 * g, 8.0, 9.0, 0.7, 1.0, fib_x1 - 1, -8],
        ], g), cap=9 * g),
    ), ())
    # knee above: femoral condyles + distal femur, patella; ankle below: talus, calcaneus
    fem = _tube(_scale_rows([
        [-320 * g, 14, 14.6, q, 0.0, 0, 0],
        [-110 * g, 20, 18, 0.66, 0.4, 0, -1],
        [-45 * g, 38, 30, 0.85, 1.0, 0, -6],
        [-14 * g, 39, 32, 0.86, 1.0, 0, -9],
        [-6 * g, 32, 30, 0.86, 1.0, 0, -10],
    ], g), cap=14 * g)
    knee = Bone3D("knee", (fem,), (
        _ell((-20 * g, -20, -14), (20, 17, 27), g, 1.0),
        _ell((-22 * g, 20, -12), (18, 17, 26), g, 1.0),
        _ell(((-45 + 8 * j[3]) * g, 3, 44), (21, 19, 10), g, 0.9),  # patella
    ), ((_ell((-8 * g, 0, -22), (14, 9, 12), g, 0.0), 0.7),))
    foot = Bone3D("foot", (), (
        _ell((L + 20 * g, 0, 0), (14, 18, 25), g, 1.0),  # talus
        _ell((L + 58 * g, 2, -25), (24, 16, 40), g, 1.0),  # calcaneus
        _ell((L + 40 * g, -4, 40), (15, 19, 22), g, 1.0),  # navicular / midfoot
    ))
    leg = _tube(_scale_rows([
        [-260 * g, 70, 72, 0, 0, 0, -10],
        [-40 * g, 56, 56, 0, 0, 0, -4],
        [0.12 * L, 55 * body.soft, 60 * body.soft, 0, 0, 0, -10],
        [0.32 * L, 52 * body.soft, 60 * body.soft, 0, 0, 0, -16],
        [0.62 * L, 40 * body.soft, 42 * body.soft, 0, 0, 0, -8],
        [0.88 * L, 31, 30, 0, 0, 2, -2],
        [L + 30 * g, 36, 46, 0, 0, 0, -5],
        [L + 200 * g, 36, 70, 0, 0, 0, 10],
    ], g), bow=(bow[0] * 0.5, bow[1] * 0.5))
    return Scene3D(
        bones=(main, fibula, knee, foot), shaft=shaft, soft_tubes=(leg,), soft_blobs=(),
        fat_mm=body.fat_mm, length=L,
        lesion_zones={"metaphyseal": ((0.06, 0.19), (0.82, 0.93)), "diaphyseal": ((0.25, 0.75),)},
    )


BUILDERS = {"humerus": humerus, "tibia": tibia, "femur": femur}
MEAN_LENGTH = {"humerus": 315.0, "tibia": 370.0, "femur": 450.0}


def build_scene(body_part: str, body: Body, view_deg: float) -> Scene3D:
    try:
        return BUILDERS[body_part](body, view_deg)
    except KeyError:
        raise ValueError(
            f"unknown body part {body_part!r}; expected one of {sorted(BUILDERS)}") from None


# ------------------------------------------------------------------------------------ projection

def project_point(p: Vec3, omega_deg: float) -> tuple[float, float, float]:
    """(s, t, depth) of a 3D point seen at view angle omega."""
    c, s = math.cos(math.radians(omega_deg)), math.sin(math.radians(omega_deg))
    return p[0], p[1] * c + p[2] * s, -p[1] * s + p[2] * c


def project_tube(tube: Tube3D, omega_deg: float) -> Tube2D:
    c, s = math.cos(math.radians(omega_deg)), math.sin(math.radians(omega_deg))
    rx, ry = np.asarray(tube.rx), np.asarray(tube.ry)
    half = np.sqrt((rx * c) ** 2 + (ry * s) ** 2)
    chord = np.divide(2 * rx * ry, half, out=np.zeros_like(half), where=half > 1e-9)
    centre = np.asarray(tube.offx) * c + np.asarray(tube.offy) * s
    p0 = project_point(tube.p0, omega_deg)
    p1 = project_point(tube.p1, omega_deg)
    l3 = math.dist(tube.p0, tube.p1)
    l2 = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
    max_chord = math.inf
    if l3 > 0 and l2 < 0.999 * l3:  # inclined to the image: longer chords, capped by its length
        l2e = max(l2, 0.5)
        chord = chord * (l3 / l2e)
        max_chord = l3 + 2 * float(np.max(rx))
        if l2 < 0.5:
            p1 = (p0[0] + 0.5, p0[1], 0.0)
    return Tube2D(
        p0=(p0[0], p0[1]), p1=(p1[0], p1[1]), knots=tube.knots, half=tuple(half),
        chord=tuple(chord), centre=tuple(centre), inner=tube.inner, trab=tube.trab, cap=tube.cap,
        max_chord=max_chord,
    )


def project_ellipsoid(ell: Ellipsoid3D, omega_deg: float) -> Ellipsoid2D:
    c, s = math.cos(math.radians(omega_deg)), math.sin(math.radians(omega_deg))
    a_s, a_x, a_y = ell.semi
    b = math.hypot(a_x * c, a_y * s)
    chord = 2 * a_x * a_y / max(b, 1e-9)
    ps, pt, _ = project_point(ell.centre, omega_deg)
    inner = max(0.0, 1.0 - ell.shell / max(min(ell.semi), 1e-9)) if ell.shell > 0 else 0.0
    return Ellipsoid2D(centre=(ps, pt), a=a_s, b=b, chord=chord, tilt_deg=ell.tilt_deg, inner=inner,
                       trab=ell.trab)
