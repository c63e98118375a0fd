"""Analytic path lengths of projected primitives on a pixel grid (no I/O, numpy only).

A radiograph is a parallel projection along the depth axis. Every primitive here is convex and
its chord length along a ray is known in closed form:

- a tube (long-bone shaft, femoral neck, screw, soft-tissue envelope) with an elliptical
  cross-section whose half-width, centre and central chord vary along its axis: the chord at
  lateral offset v from the centre is ``c(u) * sqrt(1 - (v / b(u))**2)``;
- an ellipsoid (epiphysis, head, condyle, patella, lesion): ``c * sqrt(1 - q)``, q the
  normalised squared distance from its projected centre;
- a rectangular bar (a plate), whose projection along any direction is a trapezoid.

Coordinates. Primitives live in 2D *bone coordinates* (s along the main bone, distal positive;
t across it), both in mm, after the 3D anatomy has been projected for the view
(`boneaug.synth.anatomy`). `Placement` maps bone coordinates to pixels of the *working grid*
(the stored image divided by `factor`; smooth fields are computed there and upsampled).
Each primitive is evaluated only on the pixel box it can touch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

TABLE = 512  # entries of a tube's profile look-up tables


@dataclass(frozen=True)
class Placement:
    """Bone coordinates (s, t) in mm -> working-grid pixel coordinates (x = column, y = row).

    The frame centre shows bone point (s_c, t_c); the bone axis is turned by `rotation_deg`
    from the image vertical; `mirror` flips t (left/right limb, lateral-view convention).
    `motion` = (angle_deg, pivot_s, pivot_t, shift_s, shift_t) moves the bone rigidly in its own
    coordinates first (a displaced fracture fragment).
    """

    s_c: float
    t_c: float
    rotation_deg: float
    mirror: bool
    spacing_mm: float  # of the working grid
    height: int  # working grid rows
    width: int  # working grid columns
    motion: tuple[float, float, float, float, float] | None = None

    @cached_property
    def matrix(self) -> np.ndarray:
        """(2, 3) affine: [x, y] = M @ [s, t, 1] in working-grid pixels (pixel centres at +0.5)."""
        th = math.radians(self.rotation_deg)
        m = -1.0 if self.mirror else 1.0
        k = 1.0 / self.spacing_mm
        # unit s points down the image (turned by th); unit t points right (times mirror)
        es = (math.sin(th) * k, math.cos(th) * k)
        et = (m * math.cos(th) * k, -m * math.sin(th) * k)
        cx, cy = self.width / 2.0, self.height / 2.0
        ox = cx - es[0] * self.s_c - et[0] * self.t_c
        oy = cy - es[1] * self.s_c - et[1] * self.t_c
        base = np.array([[es[0], et[0], ox], [es[1], et[1], oy], [0.0, 0.0, 1.0]])
        if self.motion is not None:
            angle, ps, pt, ds, dt = self.motion
            a = math.radians(angle)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            move = np.eye(3)
            move[:2, :2] = rot
            move[:2, 2] = np.array([ps, pt]) - rot @ np.array([ps, pt]) + np.array([ds, dt])
            base = base @ move
        return base[:2]

    def moved(self, angle_deg: float, pivot: tuple[float, float],
              shift: tuple[float, float]) -> Placement:
        """Bone point p drawn where this placement draws pivot + R(angle)(p - pivot) + shift."""
        return replace(self, motion=(angle_deg, pivot[0], pivot[1], shift[0], shift[1]))

    def to_pixels(self, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mat = self.matrix
        return mat[0, 0] * s + mat[0, 1] * t + mat[0, 2], mat[1, 0] * s + mat[1, 1] * t + mat[1, 2]


@dataclass(frozen=True)
class Tube2D:
    """A projected tube: axis from p0 to p1 (bone coordinates, mm), profiles along u in [0, 1].

    half: half-width b(u); chord: central chord c(u) (0 where the tube does not exist);
    centre: lateral offset of the centre line from the straight axis; inner: inner/outer ratio
    (medullary canal); trab: trabecular weight of the inner material (0 marrow, 1 cancellous).
    Profiles are sampled at the same knots; `cap` rounds the ends over that many mm.
    """

    p0: tuple[float, float]
    p1: tuple[float, float]
    knots: tuple[float, ...]
    half: tuple[float, ...]
    chord: tuple[float, ...]
    centre: tuple[float, ...]
    inner: tuple[float, ...]
    trab: tuple[float, ...]
    cap: float = 0.0
    max_chord: float = math.inf  # a short cylinder seen nearly end-on is at most this thick


@dataclass(frozen=True)
class Ellipsoid2D:
    """A projected ellipsoid: centre (s, t), semi-axes a (along the turned s axis) and b, central
    chord c, turned by `tilt_deg` in the image plane; `inner` = inner/outer scale (the shell)."""

    centre: tuple[float, float]
    a: float
    b: float
    chord: float
    tilt_deg: float = 0.0
    inner: float = 0.0
    trab: float = 1.0


@dataclass(frozen=True)
class Bar2D:
    """A projected rectangular bar along p0 -> p1 (a plate): trapezoid chord profile across it."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    plateau: float  # half-width of the flat top
    half: float  # half-width where the chord reaches 0
    chord: float  # chord on the flat top


def _frame(p0: tuple[float, float],
           p1: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    d = np.array(p1, dtype=np.float64) - np.array(p0, dtype=np.float64)
    length = float(np.hypot(*d))
    if length < 1e-9:
        return np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.0
    eu = d / length
    return eu, np.array([-eu[1], eu[0]]), length


def local_grid(
    placement: Placement,
    origin: tuple[float, float],
    eu: np.ndarray,
    ev: np.ndarray,
    extent: tuple[float, float, float, float],
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Pixel box touched by a primitive and its local coordinates there.

    extent = (u_min, u_max, v_min, v_max) in mm along eu / ev from origin (bone coordinates).
    Returns ((rows, cols) slices, u (h, w), v (h, w)) in float32, or None when off the grid.
    """
    mat = placement.matrix
    u0, u1, v0, v1 = extent
    corners_u = np.array([u0, u1, u0, u1])
    corners_v = np.array([v0, v0, v1, v1])
    s = origin[0] + corners_u * eu[0] + corners_v * ev[0]
    t = origin[1] + corners_u * eu[1] + corners_v * ev[1]
    px = mat[0, 0] * s + mat[0, 1] * t + mat[0, 2]
    py = mat[1, 0] * s + mat[1, 1] * t + mat[1, 2]
    c0 = max(0, int(math.floor(px.min())))
    c1 = min(placement.width, int(math.ceil(px.max())) + 1)
    r0 = max(0, int(math.floor(py.min())))
    r1 = min(placement.height, int(math.ceil(py.max())) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    # pixel (col, row) centre -> bone coordinates via the inverse of the 2x2 part
    lin = mat[:, :2]
    inv = np.linalg.inv(lin)
    xs = np.arange(c0, c1, dtype=np.float64) + 0.5 - mat[0, 2]
    ys = np.arange(r0, r1, dtype=np.float64) + 0.5 - mat[1, 2]
    # (s - origin_s, t - origin_t) for each pixel, then projected on eu / ev
    ds_x, ds_y = inv[0, 0], inv[0, 1]
    dt_x, dt_y = inv[1, 0], inv[1, 1]
    a_u = ds_x * eu[0] + dt_x * eu[1]
    b_u = ds_y * eu[0] + dt_y * eu[1]
    a_v = ds_x * ev[0] + dt_x * ev[1]
    b_v = ds_y * ev[0] + dt_y * ev[1]
    off_u = -(origin[0] * eu[0] + origin[1] * eu[1])
    off_v = -(origin[0] * ev[0] + origin[1] * ev[1])
    u = (a_u * xs)[None, :].astype(np.float32) + (b_u * ys + off_u)[:, None].astype(np.float32)
    v = (a_v * xs)[None, :].astype(np.float32) + (b_v * ys + off_v)[:, None].astype(np.float32)
    return (slice(r0, r1), slice(c0, c1)), u, v


def _table(knots: tuple[float, ...], values: tuple[float, ...]) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, TABLE)
    return np.interp(grid, np.asarray(knots), np.asarray(values)).astype(np.float32)


def tube_chords(
    tube: Tube2D, placement: Placement, pad: float = 0.0
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """(box, outer chord, inner chord, trabecular chord) of a tube on the grid, mm, float32."""
    eu, ev, length = _frame(tube.p0, tube.p1)
    if length <= 0:
        return None
    half = _table(tube.knots, tube.half)
    chord = _table(tube.knots, tube.chord)
    centre = _table(tube.knots, tube.centre)
    inner = _table(tube.knots, tube.inner)
    trab = _table(tube.knots, tube.trab)
    if tube.cap > 0:
        um = np.linspace(0.0, length, TABLE)
        d = np.minimum(um, length - um)
        cap = np.sqrt(np.clip(1.0 - (1.0 - np.clip(d / tube.cap, 0.0, 1.0)) ** 2, 0.0, 1.0))
        half = half * cap.astype(np.float32)
        chord = chord * cap.astype(np.float32)
    half[0] = half[-1] = 0.0
    chord[0] = chord[-1] = 0.0
    vmax = float(np.max(np.abs(centre) + half)) + pad
    found = local_grid(placement, tube.p0, eu, ev, (-pad, length + pad, -vmax, vmax))
    if found is None:
        return None
    box, u, v = found
    idx = u * np.float32((TABLE - 1) / length) + np.float32(0.5)
    idx = np.clip(idx, 0, TABLE - 1).astype(np.intp)
    b = half[idx]
    w = v - centre[idx]
    c = chord[idx]
    # chord * sqrt(1 - (w/b)^2), computed as chord/b * sqrt(b^2 - w^2) with b = 0 -> 0
    bb = b * b
    outer = np.sqrt(np.maximum(bb - w * w, 0.0))
    scale = np.divide(c, b, out=np.zeros_like(c), where=b > 1e-6)
    k = inner[idx]
    bi = b * k
    inn = np.sqrt(np.maximum(bi * bi - w * w, 0.0))
    outer *= scale
    inn *= scale
    if math.isfinite(tube.max_chord):
        np.minimum(outer, np.float32(tube.max_chord), out=outer)
        np.minimum(inn, np.float32(tube.max_chord), out=inn)
    return box, outer, inn, inn * trab[idx]


def ellipsoid_chords(
    ell: Ellipsoid2D, placement: Placement, grow: float = 0.0
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """(box, outer, inner, trabecular) chords of an ellipsoid; `grow` enlarges it (mm)."""
    th = math.radians(ell.tilt_deg)
    eu = np.array([math.cos(th), math.sin(th)])
    ev = np.array([-math.sin(th), math.cos(th)])
    a, b = ell.a + grow, ell.b + grow
    found = local_grid(placement, ell.centre, eu, ev, (-a, a, -b, b))
    if found is None:
        return None
    box, u, v = found
    q = (u * np.float32(1.0 / a)) ** 2 + (v * np.float32(1.0 / b)) ** 2
    c = ell.chord * (1.0 + grow / max(min(ell.a, ell.b), 1e-6))
    outer = np.float32(c) * np.sqrt(np.maximum(1.0 - q, 0.0))
    if ell.inner > 0:
        k = ell.inner
        inn = np.float32(c * k) * np.sqrt(np.maximum(1.0 - q * np.float32(1.0 / (k * k)), 0.0))
    else:
        inn = np.zeros_like(outer)
    return box, outer, inn, inn * np.float32(ell.trab)


def bar_chords(bar: Bar2D, placement: Placement) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """(box, chord) of a rectangular bar with rounded ends."""
    eu, ev, length = _frame(bar.p0, bar.p1)
    extent = (-bar.half, length + bar.half, -bar.half, bar.half)
    found = local_grid(placement, bar.p0, eu, ev, extent)
    if found is None:
        return None
    box, u, v = found
    across = np.clip((bar.half - np.abs(v)) / max(bar.half - bar.plateau, 1e-3), 0.0, 1.0)
    ends = np.clip(np.minimum(u, length - u) / max(bar.half * 0.5, 1e-3) + 1.0, 0.0, 1.0)
    return box, np.float32(bar.chord) * across * ends


def interval_overlap(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Length of [a0, a1] n [b0, b1], elementwise (0 when disjoint or empty)."""
    return np.maximum(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0)
