"""Confounders as metal path lengths: fixation hardware and external objects (no I/O).

Hardware is placed on the main shaft in bone coordinates (plates on a side of the bone with
screws through both cortices, an intramedullary nail with locking screws, a femoral sliding hip
screw) and projected like the anatomy, so a screw is a bar in one view and a bright dot in the
other. External objects (rings, snap buttons, coins, lead markers, safety pins) lie in the frame.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from boneaug.synth.anatomy import (
    Ellipsoid3D,
    Scene3D,
    Tube3D,
    project_ellipsoid,
    project_point,
    project_tube,
    rod,
)
from boneaug.synth.raster import (
    Bar2D,
    Placement,
    bar_chords,
    ellipsoid_chords,
    local_grid,
    tube_chords,
)
from boneaug.synth.spec import HardwareSpec, ObjectSpec

Vec3 = tuple[float, float, float]


def _add(field: np.ndarray, found: tuple | None, index: int = 1, scale: float = 1.0) -> None:
    if found is not None:
        field[found[0]] += found[index] * np.float32(scale) if scale != 1.0 else found[index]


def _screw(p0: Vec3, p1: Vec3, radius: float, pitch: float) -> Tube3D:
    """A threaded screw: the radius alternates along its length at the thread pitch."""
    length = math.dist(p0, p1)
    n = max(2, int(length / (pitch / 2)))
    knots = tuple(np.linspace(0.0, 1.0, n + 1))
    radii = tuple(radius * (0.78 if k % 2 else 1.0) for k in range(n + 1))
    m = n + 1
    return Tube3D(p0=p0, p1=p1, knots=knots, rx=radii, ry=radii, inner=(0.0,) * m, trab=(0.0,) * m,
                  offx=(0.0,) * m, offy=(0.0,) * m, cap=radius * 0.6)


def _nail(shaft: Tube3D, u0: float, u1: float) -> Tube3D:
    """A cannulated intramedullary nail along the (bowed) centre line of the shaft."""
    _, rx, ry, inner = shaft.at(0.5)
    radius = 0.75 * min(rx, ry) * inner
    length = shaft.p1[0] - shaft.p0[0]
    ramp = 4.0 / length  # rounded ends over 4 mm
    knots = np.union1d(np.asarray(shaft.knots), [u0, u0 + ramp, u1 - ramp, u1])
    r = np.interp(knots, [0.0, u0, u0 + ramp, u1 - ramp, u1, 1.0], [0, 0, radius, radius, 0, 0])
    k = np.asarray(shaft.knots)
    n = len(knots)
    return Tube3D(p0=shaft.p0, p1=shaft.p1, knots=tuple(knots), rx=tuple(r), ry=tuple(r),
                  inner=(0.45,) * n, trab=(0.0,) * n,
                  offx=tuple(np.interp(knots, k, shaft.offx)),
                  offy=tuple(np.interp(knots, k, shaft.offy)))


def _plate(scene: Scene3D, u0: float, u1: float, side_deg: float, omega_deg: float, width: float,
           thick: float) -> list[Bar2D]:
    """Plate segments along the shaft surface on `side_deg`, as projected bars."""
    a = math.radians(side_deg)
    n = np.array([math.cos(a), math.sin(a)])  # radial direction in (x, y)
    e = np.array([-math.sin(a), math.cos(a)])
    w = math.radians(omega_deg)
    tdir = np.array([math.cos(w), math.sin(w)])
    ddir = np.array([-math.sin(w), math.cos(w)])
    hn, he = thick / 2, width / 2
    reach_n, reach_e = hn * abs(n @ tdir), he * abs(e @ tdir)
    half = reach_n + reach_e
    plateau = abs(reach_n - reach_e)
    chord = min(2 * hn / max(abs(n @ ddir), 1e-6), 2 * he / max(abs(e @ ddir), 1e-6))
    bars = []
    us = np.linspace(u0, u1, 4)
    for ua, ub in zip(us[:-1], us[1:], strict=True):
        pts = []
        for u in (ua, ub):
            (s, x, y), rx, ry, _ = scene.shaft.at(float(u))
            r = math.hypot(rx * n[0], ry * n[1])
            off = r + hn + 0.5
            pts.append(project_point((s, x + n[0] * off, y + n[1] * off), omega_deg))
        bars.append(Bar2D((pts[0][0], pts[0][1]), (pts[1][0], pts[1][1]), plateau, half, chord))
    return bars


def hardware_metal(hw: HardwareSpec, scene: Scene3D, omega_deg: float, placement: Placement,
                   metal: np.ndarray) -> None:
    """Add the hardware's metal path lengths (mm) to `metal` (working grid) in place."""
    g = scene.shaft.at(0.5)[1] / 14.0  # rough size of this bone
    pitch = max(1.75, 2.5 * placement.spacing_mm)
    tubes: list[Tube3D] = []
    heads: list[Ellipsoid3D] = []
    if hw.kind in ("plate", "hip_screw"):
        side = hw.side_deg
        for bar in _plate(scene, hw.u0, hw.u1, side, omega_deg, 13.0 + 3 * g, 4.5):
            _add(metal, bar_chords(bar, placement))
        a = math.radians(side)
        for u in hw.screws:
            (s, x, y), rx, ry, _ = scene.shaft.at(u)
            r = math.hypot(rx * math.cos(a), ry * math.sin(a))
            outside = (s, x + math.cos(a) * (r + 5.0), y + math.sin(a) * (r + 5.0))
            # just past the far cortex
            far = (s, x - math.cos(a) * (r + 1.5), y - math.sin(a) * (r + 1.5))
            tubes.append(_screw(outside, far, 2.2, pitch))
            heads.append(Ellipsoid3D(outside, (4.0, 4.0, 4.0), shell=0.0))
    if hw.kind == "hip_screw":
        neck = scene.bones[0].tubes[1]  # base of the neck -> head centre
        base, head = np.array(neck.p0), np.array(neck.p1)
        axis = (head - base) / np.linalg.norm(head - base)
        (s, x, y), rx, _, _ = scene.shaft.at(hw.u0)
        start = np.array([s + 10.0, x + rx + 4.0, y])
        tip = head - axis * 8.0
        tubes.append(rod(tuple(start), tuple(start + (tip - start) * 0.7), 4.0))  # barrel + shank
        tubes.append(_screw(tuple(start + (tip - start) * 0.7), tuple(tip), 6.0, max(3.0, pitch)))
    if hw.kind == "nail":
        tubes.append(_nail(scene.shaft, hw.u0, hw.u1))
        for u in hw.screws:
            (s, x, y), rx, ry, _ = scene.shaft.at(u)
            tubes.append(_screw((s, x + rx + 5.0, y), (s, x - rx - 4.0, y), 2.4, pitch))
    for tube in tubes:
        found = tube_chords(project_tube(tube, omega_deg), placement)
        if found is not None:
            box, outer, inner, _ = found
            metal[box] += outer - inner
    for ell in heads:
        _add(metal, ellipsoid_chords(project_ellipsoid(ell, omega_deg), placement))


@lru_cache(maxsize=8)
def _letter_mask(letter: str, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=int(size * 0.9))
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    draw.text((size * 0.18, -size * 0.08), letter, fill=255, font=font)
    return np.asarray(img, dtype=np.float32) / 255.0


def object_metal(obj: ObjectSpec, frame: Placement, metal: np.ndarray) -> None:
    """Add an external object's path length (mm, as dense metal) to `metal` in place.

    `frame` maps image-space mm from the frame centre (s = down, t = right) to the working grid.
    """
    size = obj.size_mm
    th = math.radians(obj.tilt_deg)
    eu = np.array([math.cos(th), math.sin(th)])
    ev = np.array([-math.sin(th), math.cos(th)])
    centre = (obj.y_mm, obj.x_mm)
    half = size / 2 + 2.0
    found = local_grid(frame, centre, eu, ev, (-half, half, -half, half))
    if found is None:
        return
    box, u, v = found
    squash = 0.45 + 0.55 * abs(math.cos(th * 1.7))  # tilted out of the image plane
    rho = np.sqrt(u * u + (v / squash) ** 2)
    if obj.kind == "ring":
        big, wire = size / 2 - 1.2, 1.2
        chord = 2 * np.sqrt(np.maximum(wire * wire - (rho - big) ** 2, 0.0)) / squash
    elif obj.kind == "snap":
        big, wire = size * 0.33, size * 0.1
        chord = 2 * np.sqrt(np.maximum(wire * wire - (rho - big) ** 2, 0.0)) / squash
        chord += np.where(rho < size * 0.14, 1.5 / squash, 0.0)
    elif obj.kind == "coin":
        chord = np.where(rho < size / 2, 1.8 / squash, 0.0) * np.clip((size / 2 - rho) + 0.5, 0, 1)
    elif obj.kind == "pin":
        wire = 0.6
        arm1 = np.sqrt(np.maximum(wire * wire - (v - 2.0) ** 2, 0.0)) * (np.abs(u) < size / 2)
        arm2 = np.sqrt(np.maximum(wire * wire - (v + 2.0) ** 2, 0.0)) * (np.abs(u) < size / 2)
        coil = np.sqrt(np.maximum(wire * wire - (np.hypot(u + size / 2, v) - 2.5) ** 2, 0.0))
        head = np.where((np.abs(u - size / 2) < 4) & (np.abs(v) < 3.2), 1.2, 0.0)
        chord = 2 * (arm1 + arm2 + coil) + head
    else:  # lead marker letter: much denser than steel, so scaled up
        n = 64
        mask = _letter_mask(obj.letter or "L", n)
        iu = np.clip(((u / size) + 0.5) * n, 0, n - 1).astype(np.intp)
        iv = np.clip(((v / size) + 0.5) * n, 0, n - 1).astype(np.intp)
        plate = np.where((np.abs(u) < size / 2) & (np.abs(v) < size / 2), 0.4, 0.0)
        chord = plate + 6.0 * mask[iu, iv]
    metal[box] += chord.astype(np.float32)
