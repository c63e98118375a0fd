"""Image formation: path lengths -> Beer-Lambert -> scatter, quantum noise, blur -> log -> 12 bits.

    A        = sum_m mu_m L_m                     per pixel, analytic chords (raster/anatomy)
    I        = heel * (exp(-A) + scatter)         scatter = low-pass of the primary
    N        ~ Poisson(I0 I)                      (Gaussian approximation, I0 I >> 1)
    p        = log(I0) - log(blur(N))             detector log amplifier
    p'       = p - k * lowpass(p)                 the usual large-kernel dynamic-range compression
    stored   = offset + gain p'                   12-bit, air ~ offset, densest bone ~ `top`

Smooth fields (path lengths, texture, lesions, hardware) are computed on a working grid of half
the stored resolution for stored images of 384 rows or more and upsampled bilinearly before the
noise: at 1024x512 a working pixel is ~0.9 mm, finer than the detector blur that follows.
The quantum noise is drawn from the `rng` passed in, which is the only randomness used here:
the same spec renders the same anatomy, lesion and texture, and the same rng the same noise.

Attenuation coefficients (1/mm, effective ~55-60 keV): muscle 0.021, fat 0.018, yellow marrow
0.019, cancellous bone 0.032 (~30 % bone volume), cortical bone 0.057, steel (effective, with
beam hardening ignored) 0.6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from boneaug.synth.anatomy import Bone3D, Scene3D, build_scene, project_ellipsoid, project_tube
from boneaug.synth.confounders import hardware_metal, object_metal
from boneaug.synth.lesions import apply_lesion, lesion_box, lesion_geometry
from boneaug.synth.raster import Placement, ellipsoid_chords, local_grid, tube_chords
from boneaug.synth.spec import ImageSpec

MU_MUSCLE = 0.021
MU_FAT = 0.018
MU_MARROW = 0.019
MU_TRAB = 0.032
MU_CORTEX = 0.057
MU_METAL = 0.6
MAX_STORED_BITS = 16


@dataclass
class RenderedImage:
    """A rendered radiograph.

    stored: (H, W) uint16, the detector values in MONOCHROME2 sense, before any inversion or
        rescale, 0 .. 2**bits_stored - 1.
    window_center / window_width: the VOI window in stored units (MONOCHROME2 sense).
    boxes: lesion boxes [x0, y0, x1, y1) in stored pixels (empty without a lesion).
    pixels (property): (H, W) float32 in [0, 1], the windowed display image (1 = bright =
        attenuating), what a reader gets after rescale + VOI window (+ MONOCHROME1 inversion);
        computed on first use.
    """

    stored: np.ndarray
    window_center: float
    window_width: float
    boxes: list[list[int]]
    spec: ImageSpec
    extras: dict[str, float] = field(default_factory=dict)
    _pixels: np.ndarray | None = field(default=None, repr=False)

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            values = self.stored.astype(np.float32)
            self._pixels = voi_window(values, self.window_center, self.window_width)
        return self._pixels

    @property
    def pixel_spacing_mm(self) -> float:
        return self.spec.spacing_mm


def working_factor(height: int) -> int:
    """Working-grid downsampling: 2 for stored images of 384 rows or more, else 1."""
    return 2 if height >= 384 else 1


# ------------------------------------------------------------------------------------ filters

def blur121(a: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication, `passes` times. (H, W) -> (H, W)."""
    for _ in range(passes):
        a = blur3(a, 0.25)
    return a


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation, pixel centres aligned."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def upsample2(a: np.ndarray) -> np.ndarray:
    """Exact 2x bilinear upsampling (align_corners=False). (h, w) -> (2h, 2w) float32.

    Columns first on the small array (strided writes on half the data), then whole rows.
    """
    h, w = a.shape
    a = a.astype(np.float32, copy=False)
    q = np.float32(0.25)
    cols = np.empty((h, 2 * w), np.float32)
    even, odd = cols[:, 0::2], cols[:, 1::2]
    np.multiply(a, np.float32(0.75), out=even)
    even[:, 1:] += q * a[:, :-1]
    even[:, 0] += q * a[:, 0]
    odd[...] = a * np.float32(0.75)
    odd[:, :-1] += q * a[:, 1:]
    odd[:, -1] += q * a[:, -1]
    out = np.empty((2 * h, 2 * w), np.float32)
    even, odd = out[0::2], out[1::2]
    np.multiply(cols, np.float32(0.75), out=even)
    even[1:] += q * cols[:-1]
    even[0] += q * cols[0]
    odd[...] = cols * np.float32(0.75)
    odd[:-1] += q * cols[1:]
    odd[-1] += q * cols[-1]
    return out


def blur3(a: np.ndarray, weight: float) -> np.ndarray:
    """Separable [w, 1 - 2w, w] blur with edge replication (w = 0.25 is [1, 2, 1] / 4)."""
    w = np.float32(weight)
    c = np.float32(1.0 - 2.0 * weight)
    b = a * c
    t = a[:-2] + a[2:]
    t *= w
    b[1:-1] += t
    b[0] += w * (a[0] + a[1])
    b[-1] += w * (a[-2] + a[-1])
    out = b * c
    t = b[:, :-2] + b[:, 2:]
    t *= w
    out[:, 1:-1] += t
    out[:, 0] += w * (b[:, 0] + b[:, 1])
    out[:, -1] += w * (b[:, -2] + b[:, -1])
    return out


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (pixel centres aligned, like align_corners=False). (h, w) -> (H, W).

    Exact 2x upsampling goes through `upsample2`; other sizes interpolate columns first (meant
    for small inputs such as low-pass fields: the row pass then copies whole rows).
    """
    h, w = a.shape
    if (h, w) == (height, width):
        return a
    if height > h and 0 <= 2 * h - height <= 1 and 0 <= 2 * w - width <= 1:
        return upsample2(a.astype(np.float32, copy=False))[:height, :width]
    r0, r1, rw = _axis_weights(h, height)
    c0, c1, cw = _axis_weights(w, width)
    cols = a[:, c0] * (1 - cw) + a[:, c1] * cw
    return cols[r0] * (1 - rw)[:, None] + cols[r1] * rw[:, None]


def _block_lowpass(a: np.ndarray, block: int, passes: int) -> np.ndarray:
    """Block means of `a` (edge-padded to whole blocks), then `passes` [1, 2, 1] blurs."""
    h, w = a.shape
    hb, wb = -(-h // block), -(-w // block)
    padded = np.pad(a, ((0, hb * block - h), (0, wb * block - w)), mode="edge")
    small = padded.reshape(hb, block, wb, block).mean(axis=(1, 3), dtype=np.float32)
    return blur121(small, passes)


def _expand(small: np.ndarray, block: int, like: tuple[int, int],
            out_shape: tuple[int, int]) -> np.ndarray:
    """Bilinear from the block grid of an array shaped `like` to `out_shape` (a multiple of it)."""
    hb, wb = small.shape
    fy, fx = out_shape[0] / like[0], out_shape[1] / like[1]
    big = resize_bilinear(small, round(hb * block * fy), round(wb * block * fx))
    return big[:out_shape[0], :out_shape[1]]


def lowpass(a: np.ndarray, block: int, passes: int = 6,
            out_shape: tuple[int, int] | None = None) -> np.ndarray:
    """A broad low-pass: block means, [1, 2, 1] blurs, bilinear back to `out_shape` (default: a's).

    (h, w) -> out_shape. The block grid is aligned with a's pixel grid, so an out_shape that is
    a multiple of (h, w) maps block centres consistently.
    """
    small = _block_lowpass(a, block, passes)
    return _expand(small, block, a.shape, out_shape if out_shape is not None else a.shape)


def texture(shape: tuple[int, int], seed: int, spacing_mm: float) -> np.ndarray:
    """Trabecular texture, mean 1: band-limited noise elongated along the image vertical,
    plus a coarser density variation (~4 mm). (h, w) float32."""
    rng = np.random.default_rng([seed, 7])
    n = rng.standard_normal(shape, dtype=np.float32)
    # vertical [1, 4, 6, 4, 1] / 16, horizontal [1, 2, 1] / 4: struts along the bone axis
    v = n * np.float32(6 / 16)
    v[1:] += n[:-1] * np.float32(4 / 16)
    v[:-1] += n[1:] * np.float32(4 / 16)
    v[2:] += n[:-2] * np.float32(1 / 16)
    v[:-2] += n[2:] * np.float32(1 / 16)
    h = v * np.float32(0.5)
    h[:, 1:] += v[:, :-1] * np.float32(0.25)
    h[:, :-1] += v[:, 1:] * np.float32(0.25)
    h *= np.float32(0.16 / 0.42)  # unit variance before the 0.16 amplitude (std of the filter)
    step = max(2, round(4.0 / spacing_mm))
    coarse = rng.standard_normal((-(-shape[0] // step), -(-shape[1] // step)), dtype=np.float32)
    coarse = resize_bilinear(coarse, coarse.shape[0] * step, coarse.shape[1] * step)
    coarse = coarse[:shape[0], :shape[1]]
    h += np.float32(0.05 / 0.75) * coarse  # bilinear interpolation keeps ~0.75 of the std
    h += np.float32(1.0)
    return h


# ------------------------------------------------------------------------------------ fields

@dataclass
class BoneFields:
    """Chord lengths (mm) of one bone on the working grid: total, core (inner), cancellous."""

    out: np.ndarray
    inn: np.ndarray
    trab: np.ndarray
    box: tuple[slice, slice] | None


def _union(box: tuple[slice, slice] | None, other: tuple[slice, slice]) -> tuple[slice, slice]:
    if box is None:
        return other
    return (slice(min(box[0].start, other[0].start), max(box[0].stop, other[0].stop)),
            slice(min(box[1].start, other[1].start), max(box[1].stop, other[1].stop)))


def _pow8(x: np.ndarray) -> np.ndarray:
    x = x * x
    x = x * x
    return x * x


def bone_fields(bone: Bone3D, omega_deg: float, placement: Placement) -> BoneFields:
    """Merge a bone's primitives with a p-norm, p = 8: close to the maximum, so the union is
    smooth where parts meet and a part's cortical shell does not show inside another part."""
    shape = (placement.height, placement.width)
    out3 = np.zeros(shape, np.float32)
    inn3 = np.zeros(shape, np.float32)
    trab3 = np.zeros(shape, np.float32)
    box = None
    parts = [tube_chords(project_tube(t, omega_deg), placement) for t in bone.tubes]
    parts += [ellipsoid_chords(project_ellipsoid(e, omega_deg), placement) for e in bone.ellipsoids]
    for found in parts:
        if found is None:
            continue
        b, o, i, t = found
        out3[b] += _pow8(o)
        inn3[b] += _pow8(i)
        trab3[b] += _pow8(t)
        box = _union(box, b)
    if box is None:
        return BoneFields(out3, inn3, trab3, None)
    for arr in (out3, inn3, trab3):
        arr[box] = np.sqrt(np.sqrt(np.sqrt(arr[box])))
    for hole, amount in bone.holes:
        found = ellipsoid_chords(project_ellipsoid(hole, omega_deg), placement)
        if found is None:
            continue
        b, h, _, _ = found
        h = h * np.float32(amount)
        o, i, t = out3[b], inn3[b], trab3[b]
        rem_in = np.minimum(h, i)
        rem_cx = np.minimum(np.maximum(h - i, 0.0), o - i)
        ratio = np.divide(i - rem_in, i, out=np.ones_like(i), where=i > 1e-6)
        t *= ratio
        o -= rem_in + rem_cx
        i -= rem_in
    return BoneFields(out3, inn3, trab3, box)


@dataclass(frozen=True)
class Materials:
    kappa: float  # bone/soft contrast scale
    density: float  # cancellous density scale

    def bone_attenuation(self, f: BoneFields, tex: np.ndarray,
                         box: tuple[slice, slice]) -> np.ndarray:
        """Attenuation (dimensionless) a bone adds over soft tissue it displaces, on `box`."""
        o, i, t = f.out[box], f.inn[box], f.trab[box]
        k = np.float32(self.kappa)
        cort = k * np.float32(MU_CORTEX - MU_MUSCLE)
        trab_k = k * np.float32(self.density * (MU_TRAB - MU_MARROW))
        trab_mu = np.float32(MU_MARROW - MU_MUSCLE) + trab_k * tex[box]
        return cort * (o - i) + np.float32(MU_MARROW - MU_MUSCLE) * (i - t) + trab_mu * t


def soft_tissue(scene: Scene3D, omega_deg: float,
                placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(attenuation, skin chord) of the soft-tissue envelope: fat layer over muscle."""
    shape = (placement.height, placement.width)
    skin3 = np.zeros(shape, np.float32)
    muscle3 = np.zeros(shape, np.float32)
    fat = scene.fat_mm
    for tube in scene.soft_tubes:
        t2 = project_tube(tube, omega_deg)
        # muscle = the same tube shrunk by the fat thickness: its "inner" chord
        half = np.asarray(t2.half)
        ratio = tuple(np.clip(1.0 - fat / np.maximum(half, 1e-6), 0.0, 1.0))
        found = tube_chords(replace(t2, inner=ratio, trab=(0.0,) * len(ratio)), placement)
        if found is None:
            continue
        b, o, m, _ = found
        skin3[b] += o * o * o
        muscle3[b] += m * m * m
    extra = np.zeros(shape, np.float32)
    for blob in scene.soft_blobs:
        e2 = project_ellipsoid(blob, omega_deg)
        found = ellipsoid_chords(e2, placement)
        if found is None:
            continue
        b, o, _, _ = found
        if blob.density != 1.0:  # e.g. chest wall + lung: added, not merged with the limb
            extra[b] += np.float32(MU_MUSCLE * blob.density) * o
            continue
        skin3[b] += o * o * o
        k = max(0.0, 1.0 - fat / max(min(e2.a, e2.b), 1e-6))
        muscle3[b] += (o * np.float32(k)) ** 3
    skin = np.cbrt(skin3)
    muscle = np.cbrt(muscle3)
    return np.float32(MU_FAT) * (skin - muscle) + np.float32(MU_MUSCLE) * muscle + extra, skin


def _fragment_masks(spec: ImageSpec, scene: Scene3D, placement: Placement, moved: Placement,
                    gap_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Proximal / distal fragment masks (working grid), each in its own bone coordinates."""
    fx = spec.patient.fracture
    assert fx is not None
    w = math.radians(spec.omega_deg)
    tilt = math.atan(math.tan(math.radians(fx.tilt_x_deg)) * math.cos(w)
                     + math.tan(math.radians(fx.tilt_y_deg)) * math.sin(w))
    (s, x, y), *_ = scene.shaft.at(fx.u)
    t = x * math.cos(w) + y * math.sin(w)
    soft = placement.spacing_mm
    masks = []
    for place, sign in ((placement, -1.0), (moved, 1.0)):
        found = local_grid(place, (0.0, 0.0), np.array([1.0, 0.0]), np.array([0.0, 1.0]),
                           (-1e5, 1e5, -1e5, 1e5))
        assert found is not None
        _, ss, tt = found
        d = ((ss - s) * math.cos(tilt) - (tt - t) * math.sin(tilt)) * sign
        masks.append(np.clip((d - gap_mm / 2) / soft + 0.5, 0.0, 1.0).astype(np.float32))
    return masks[0], masks[1]


def _main_bone(spec: ImageSpec, scene: Scene3D, placement: Placement) -> BoneFields:
    main = scene.bones[0]
    fx = spec.patient.fracture
    if fx is None:
        return bone_fields(main, spec.omega_deg, placement)
    w = math.radians(spec.omega_deg)
    (s, x, y), *_ = scene.shaft.at(fx.u)
    pivot = (s, x * math.cos(w) + y * math.sin(w))
    angle = fx.angle_x_deg * math.cos(w) + fx.angle_y_deg * math.sin(w)
    shift = (-fx.shorten_mm, fx.shift_x_mm * math.cos(w) + fx.shift_y_mm * math.sin(w))
    moved = placement.moved(angle, pivot, shift)
    prox = bone_fields(main, spec.omega_deg, placement)
    dist = bone_fields(main, spec.omega_deg, moved)
    m_prox, m_dist = _fragment_masks(spec, scene, placement, moved, fx.gap_mm)
    out = prox.out * m_prox + dist.out * m_dist
    inn = prox.inn * m_prox + dist.inn * m_dist
    trab = prox.trab * m_prox + dist.trab * m_dist
    box = prox.box if dist.box is None else _union(prox.box, dist.box) if prox.box else dist.box
    return BoneFields(out, inn, trab, box)


# ------------------------------------------------------------------------------------ render

def render_image(spec: ImageSpec, rng: np.random.Generator) -> RenderedImage:
    """Render `spec` to a 12-bit radiograph; `rng` draws the quantum noise only."""
    H, W = spec.height, spec.width
    f = working_factor(H)
    h, w = -(-H // f), -(-W // f)
    ps = spec.spacing_mm * f
    placement = Placement(spec.s_c, spec.t_c, spec.rotation_deg, spec.mirror, ps, h, w)
    patient = spec.patient
    omega = spec.omega_deg
    scene = build_scene(patient.body_part, patient.body, omega)
    tex = texture((h, w), spec.texture_seed, ps)
    mat = Materials(spec.exposure.kappa, patient.bone_density)

    a_soft, skin = soft_tissue(scene, omega, placement)
    a_anat = a_soft.copy()
    main = _main_bone(spec, scene, placement)
    bones = [main] + [bone_fields(b, omega, placement) for b in scene.bones[1:]]
    for bf in bones:
        if bf.box is not None:
            a_anat[bf.box] += mat.bone_attenuation(bf, tex, bf.box)
    a = a_anat.copy()

    boxes: list[list[int]] = []
    les = patient.lesion
    if les is not None and spec.with_lesion:
        geom = lesion_geometry(les, scene, omega)
        x0, y0, x1, y1 = lesion_box(geom, placement, pad_px=1.0)
        wb = (slice(max(0, y0), min(h, y1)), slice(max(0, x0), min(w, x1)))
        if wb[0].start < wb[0].stop and wb[1].start < wb[1].stop:
            before = mat.bone_attenuation(main, tex, wb)
            apply_lesion(les, geom, placement, main.out, main.inn, main.trab)
            a[wb] += mat.bone_attenuation(main, tex, wb) - before
        # working-grid box -> stored pixels; bilinear upsampling and the detector blur spread
        # a change by up to f + 1 stored pixels
        pad = f + 1
        box = [max(0, x0 * f - pad), max(0, y0 * f - pad),
               min(W, x1 * f + pad), min(H, y1 * f + pad)]
        if box[0] < box[2] and box[1] < box[3]:
            boxes.append(box)

    metal = np.zeros((h, w), np.float32)
    if patient.hardware is not None:
        hardware_metal(patient.hardware, scene, omega, placement, metal)
    if spec.objects:
        frame = Placement(0.0, 0.0, 0.0, False, ps, h, w)
        for obj in spec.objects:
            object_metal(obj, frame, metal)
    if patient.hardware is not None or spec.objects:
        a += np.float32(MU_METAL) * metal

    stored, center, width, extras = _detector(spec, a, a_anat, skin, rng, f)
    return RenderedImage(stored=stored, window_center=center, window_width=width, boxes=boxes,
                         spec=spec, extras=extras)


def voi_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI (PS3.3 C.11.2.1.2.1) onto [0, 1]. (H, W) -> (H, W) float32."""
    scale = np.float32(1.0 / max(width - 1.0, 1.0))
    out = (values - np.float32(center - 0.5)) * scale + np.float32(0.5)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _detector(spec: ImageSpec, a: np.ndarray, a_anat: np.ndarray, skin: np.ndarray,
              rng: np.random.Generator,
              f: int) -> tuple[np.ndarray, float, float, dict[str, float]]:
    ex = spec.exposure
    H, W = spec.height, spec.width
    h, w = a.shape
    ps = spec.spacing_mm * f
    block = max(2, round(8.0 / ps))

    prim_anat = np.exp(-a_anat)
    scatter = np.float32(ex.scatter) * lowpass(prim_anat, block, 6)
    intensity = np.exp(-a) + scatter
    # heel effect along the image vertical, collimator shutters
    heel = 1.0 + ex.heel * (np.linspace(-0.5, 0.5, h, dtype=np.float32))
    intensity *= heel[:, None]
    if ex.collimation is not None:
        cx0, cy0, cx1, cy1 = ex.collimation
        cols = np.arange(w) / w
        rows = np.arange(h) / h
        open_c = ((cols >= cx0) & (cols <= cx1)).astype(np.float32)
        open_r = ((rows >= cy0) & (rows <= cy1)).astype(np.float32)
        intensity *= 0.12 + 0.88 * (open_r[:, None] * open_c[None, :])  # shutters: scatter only

    # dose: behind the median soft-tissue path the detector gets `counts` photons per mm^2
    tissue = skin[::4, ::4] > 5.0
    noise_free = -np.log(prim_anat + scatter)
    ref = float(np.median(np.exp(-noise_free[::4, ::4][tissue]))) if tissue.any() else 1.0
    i0 = min(ex.counts * spec.spacing_mm ** 2 / max(ref, 1e-6), 5e6)

    # quantum noise (Gaussian approximation of Poisson) and detector blur, in place where we can:
    # every fresh full-size temporary costs page faults
    noisy = resize_bilinear(intensity.astype(np.float32), H, W)
    noisy *= np.float32(i0)
    sigma = np.sqrt(noisy)
    sigma *= rng.standard_normal((H, W), dtype=np.float32)
    noisy += sigma
    np.maximum(noisy, np.float32(1.0), out=noisy)
    beta = 1.0 - ex.sharpness
    noisy = blur3(noisy, 0.25 * float(beta))  # detector blur, [1, 2, 1] / 4 per axis at most
    p = np.log(noisy, out=noisy)
    p *= np.float32(-1.0)
    p += np.float32(math.log(i0 * (1.0 + ex.scatter)))

    # dynamic-range compression from the noise-free anatomy (independent of lesions / hardware)
    p_anat = noise_free + np.float32(math.log(1.0 + ex.scatter))
    k = np.float32(ex.equalise)
    small = _block_lowpass(p_anat, block, 8)
    small *= k
    eq_anat = p_anat - _expand(small, block, (h, w), (h, w))
    p -= _expand(small, block, (h, w), (H, W))

    if tissue.any():
        soft_level = float(np.median(eq_anat[::4, ::4][tissue]))
    else:
        soft_level = float(eq_anat.mean())
    bone_level = float(np.percentile(eq_anat[::2, ::2], 99.8))
    bone_level = max(bone_level, soft_level + 0.2)
    max_value = 2 ** spec.bits_stored - 1
    span = max_value / 4095.0  # `top` and `offset` are given for 12 bits
    offset = ex.offset * span
    gain = (ex.top - ex.offset) * span / bone_level
    p *= np.float32(gain)
    p += np.float32(offset + 0.5)  # + 0.5: round half up on the cast below
    np.clip(p, 0.0, max_value, out=p)
    stored = p.astype(np.uint16)
    lo = offset + gain * ex.win_lo * soft_level
    hi = offset + gain * ex.win_hi * bone_level
    center = round((lo + hi) / 2, 1)
    width = round(max(hi - lo, 16.0), 1)
    extras = {"i0": i0, "gain": gain, "soft_level": soft_level, "bone_level": bone_level}
    return stored, center, width, extras
