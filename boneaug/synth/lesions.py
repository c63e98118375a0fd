"""Bone lesions as changes of the main bone's path lengths (no I/O).

A lesion is an ellipsoid inside (or, when expansile, bulging out of) the main bone, long axis
along the shaft. Along each ray the bone is a depth interval: cortex [-zo, -zi] and [zi, zo]
around the medullary/cancellous core [-zi, zi] (z0 = half chords). The lesion occupies
[zc - zl, zc + zl]; the interval overlaps give the cortex and core it removes, so endosteal
scalloping and cortical thinning follow from the geometry. A sclerotic rim (Lodwick IA) is a
shell around the lesion; an expansile lesion keeps its shell outside the old cortex (remodelled,
expanded cortex). Ill-defined (moth-eaten, Lodwick II) lesions destroy bone patchily with a
wide transition zone; mixed lesions add sclerotic matrix inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from boneaug.synth.anatomy import Scene3D, project_point, project_tube
from boneaug.synth.raster import Ellipsoid2D, Placement, ellipsoid_chords, interval_overlap
from boneaug.synth.spec import LesionSpec


@dataclass(frozen=True)
class LesionGeometry:
    ellipsoid: Ellipsoid2D  # the lytic core, projected
    depth: float  # centre depth (mm) relative to the bone centre line
    outer_grow: float  # rim thickness (mm) grown around the core


def lesion_geometry(lesion: LesionSpec, scene: Scene3D, omega_deg: float) -> LesionGeometry:
    (s, x, y), rx, ry, _ = scene.shaft.at(lesion.u)
    a = math.radians(lesion.angle_deg)
    centre = (s, x + lesion.ecc * rx * math.cos(a), y + lesion.ecc * ry * math.sin(a))
    # "bone width" at a metaphysis is capped near the diaphyseal width: a lesion spanning 75 %
    # of a tibial plateau would be a different disease
    _, mid_rx, mid_ry, _ = scene.shaft.at(0.5)
    radius = min(0.5 * (rx + ry), 1.5 * 0.5 * (mid_rx + mid_ry))
    semi = lesion.width_frac * radius
    ps, pt, depth = project_point(centre, omega_deg)
    # follow the local direction of the projected shaft
    tube = project_tube(scene.shaft, omega_deg)
    knots = np.asarray(tube.knots)
    du = 0.01
    c0 = float(np.interp(lesion.u - du, knots, tube.centre))
    c1 = float(np.interp(lesion.u + du, knots, tube.centre))
    ds = (tube.p1[0] - tube.p0[0]) * 2 * du
    dt = (tube.p1[1] - tube.p0[1]) * 2 * du + (c1 - c0)
    tilt = math.degrees(math.atan2(dt, ds))
    ell = Ellipsoid2D(centre=(ps, pt), a=semi * lesion.elong, b=semi, chord=2 * semi, tilt_deg=tilt)
    # the centre depth seen in projection: the shaft centre line lies at depth of (x, y) too
    _, _, shaft_depth = project_point((s, x, y), omega_deg)
    return LesionGeometry(ell, depth - shaft_depth, lesion.rim_mm)


def lesion_box(geom: LesionGeometry, placement: Placement,
               pad_px: float) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) on the working grid that holds every pixel the lesion changes, plus pad."""
    ell = geom.ellipsoid
    grow = geom.outer_grow
    th = math.radians(ell.tilt_deg)
    phi = np.linspace(0.0, 2 * np.pi, 97)
    a, b = ell.a + grow, ell.b + grow
    u, v = a * np.cos(phi), b * np.sin(phi)
    s = ell.centre[0] + u * math.cos(th) - v * math.sin(th)
    t = ell.centre[1] + u * math.sin(th) + v * math.cos(th)
    px, py = placement.to_pixels(s, t)
    return (int(math.floor(px.min() - pad_px)), int(math.floor(py.min() - pad_px)),
            int(math.ceil(px.max() + pad_px)) + 1, int(math.ceil(py.max() + pad_px)) + 1)


def _blur(a: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        b = a * 0.5
        b[1:] += 0.25 * a[:-1]
        b[:-1] += 0.25 * a[1:]
        b[0] += 0.25 * a[0]
        b[-1] += 0.25 * a[-1]
        a = b * 0.5
        a[:, 1:] += 0.25 * b[:, :-1]
        a[:, :-1] += 0.25 * b[:, 1:]
        a[:, 0] += 0.25 * b[:, 0]
        a[:, -1] += 0.25 * b[:, -1]
    return a


def apply_lesion(
    lesion: LesionSpec,
    geom: LesionGeometry,
    placement: Placement,
    out: np.ndarray,
    inn: np.ndarray,
    trab: np.ndarray,
) -> None:
    """Change the main bone's chord fields (full working grid, mm) in place inside the lesion."""
    grown = ellipsoid_chords(geom.ellipsoid, placement, grow=geom.outer_grow)
    if grown is None:
        return
    box, zl2, _, _ = grown
    core = ellipsoid_chords(geom.ellipsoid, placement)
    zl = np.zeros_like(zl2)
    if core is not None:
        cbox, cz, _, _ = core
        # the core's box lies inside the grown one: paste it at the right offset
        r0, c0 = cbox[0].start - box[0].start, cbox[1].start - box[1].start
        zl[r0:r0 + cz.shape[0], c0:c0 + cz.shape[1]] = cz
    zl *= 0.5
    zl2 *= 0.5
    o, i, tr = out[box], inn[box], trab[box]
    zo, zi = o * 0.5, i * 0.5
    zc = np.float32(geom.depth)
    lo, hi = zc - zl, zc + zl
    rem_in = interval_overlap(-zi, zi, lo, hi)
    rem_cx = interval_overlap(zi, zo, lo, hi) + interval_overlap(-zo, -zi, lo, hi)

    rng = np.random.default_rng([lesion.seed, box[0].start, box[1].start])
    d = np.full(zl.shape, np.float32(lesion.destroy), dtype=np.float32)
    half_chord = max(geom.ellipsoid.chord * 0.5, 1e-6)
    # 1 - q: 1 at the centre, 0 at the edge
    inside = np.clip(zl / np.float32(half_chord), 0.0, 1.0) ** 2
    if lesion.lesion_type == "ill_defined":
        # moth-eaten: coalescing holes whose coverage grows with the destruction level,
        # with a wide transition zone; `d` itself then only scales the holes' depth
        holes = _blur(rng.standard_normal(zl.shape).astype(np.float32), 2)
        level = 2.4 * lesion.destroy - 1.2 + 1.4 * (np.clip(inside * 2.0, 0.0, 1.0) - 1.0)
        holes = np.clip((holes / (holes.std() + 1e-6) + level) * 1.5, 0.0, 1.0)
        d = np.minimum(d * 0.3 + 0.7, 1.0) * holes
    elif lesion.lesion_type == "mixed":
        d *= np.clip(inside * 6.0, 0.0, 1.0)
    else:
        d *= np.clip(inside * 12.0, 0.0, 1.0)  # geographic: narrow transition zone

    removed_in = d * rem_in
    new_i = i - removed_in
    ratio = np.divide(new_i, i, out=np.ones_like(i), where=i > 1e-6)
    tr *= ratio
    o -= removed_in + d * rem_cx
    i[...] = new_i

    if lesion.rim_mm > 0:
        if lesion.expansile:
            rim = 2.0 * (zl2 - zl)
        else:
            rim = interval_overlap(-zo, zo, zc - zl2, zc + zl2) - interval_overlap(-zo, zo, lo, hi)
        o += np.float32(lesion.rim_density) * np.maximum(rim, 0.0)
    if lesion.matrix > 0:
        blobs = _blur(rng.standard_normal(zl.shape).astype(np.float32), 1)
        blobs = np.clip(blobs / (blobs.std() + 1e-6) - 0.4, 0.0, 1.0)
        o += np.float32(lesion.matrix) * (rem_in + rem_cx) * blobs
