"""Pure helpers behind the HTTP service (serve/): decode an upload, place a lesion, cut, translate,
blend, score, and encode the answer. No Ray and no HTTP here: `serve/app.py` only moves bytes.

    upload bytes -> decode_radiograph (PNG 8/16-bit grayscale or DICOM via boneaug.io.dicom)
      -> box (client's, checked) or auto_box (a bright window on the bone's axis)
      -> cut_patch: square_crop(box, s) at stored resolution, resized to the UNIT side S
      -> translate (UNIT h -> l, batched by the service)
      -> paste_blended(image, translated, crop, n)           (SPEC 4; outside the crop untouched)
      -> fit_pad to the classifier size -> score (DRN, sigmoid)

`synthesise` strings the same functions together in-process; the service and the benchmark's
zero-overhead anchor run exactly this code.

Automatic box placement (`auto_box`), the rule:
1. Work on an area-downsampled copy whose longer side is at most 512 px (speed; same answer
   for any resolution up to rounding). Long bones stand upright; a landscape image is
   handled by transposing.
2. The bone is the contiguous run of columns, around the column with the brightest (smoothed)
   mean, whose mean is at least half-way between the darkest and brightest column means; its
   width is the bone width w and its middle column the bone's axis.
3. The lesion box is a square of side `fraction` x w (default 0.5, at least `min_side` px),
   centred on the axis, so it lies inside the bone.
4. Slide it along the axis; windows with mean intensity >= `min_mean_intensity` (patch-making's
   bone threshold, SPEC 2) are candidates; the brightest quarter of them (mean >= the 75th
   percentile) are kept and the seeded generator picks one. The same image and seed give the
   same box. No candidate -> RequestError("no_bone").
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from boneaug.augment.blend import paste_blended
from boneaug.data.patches import Box, crop_resize, square_crop
from boneaug.errors import BoneaugError, DataError

if TYPE_CHECKING:
    from boneaug.config import BlendMode, BoneaugConfig
    from boneaug.io.dicom import XrayImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UploadKind = Literal["png", "dicom"]


class RequestError(BoneaugError):
    """A request that cannot be served. `reason` is a short machine-readable code and `status`
    the HTTP answer: 422 for the client's input (the default), 503 when the service's models
    cannot answer."""

    def __init__(self, reason: str, message: str, *, status: int = 422) -> None:
        self.reason = reason
        self.message = message
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Limits:
    """What an upload may be: enough for real radiographs, small enough to keep replicas alive."""

    max_side: int = 6144
    max_pixels: int = 25_000_000
    min_side: int = 16

    def check(self, rows: int, columns: int, what: str) -> None:
        if rows < self.min_side or columns < self.min_side:
            raise RequestError("image_too_small", f"{what} is {rows}x{columns} pixels; at least "
                               f"{self.min_side}x{self.min_side} is needed")
        if rows > self.max_side or columns > self.max_side or rows * columns > self.max_pixels:
            raise RequestError("image_too_large", f"{what} is {rows}x{columns} pixels; the limit "
                               f"is {self.max_side} per side and {self.max_pixels} pixels in all. "
                               "Downsample it before uploading")


@dataclass(frozen=True)
class Radiograph:
    """A decoded upload: pixels (H, W) float32 in [0, 1], bone bright (MONOCHROME2)."""

    pixels: np.ndarray
    kind: UploadKind
    source: XrayImage | None = None  # the decoded DICOM (for derived-object provenance)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


# ---------------------------------------------------------------------------------------------
# decoding


def sniff(data: bytes) -> UploadKind:
    """PNG by its signature, DICOM otherwise (the DICOM reader says whether it really is one)."""
    return "png" if data[:8] == PNG_SIGNATURE else "dicom"


def decode_radiograph(data: bytes, limits: Limits = Limits()) -> Radiograph:
    if not data:
        raise RequestError("empty_upload", "the uploaded file is empty")
    return decode_png(data, limits) if sniff(data) == "png" else decode_dicom(data, limits)


_PNG_MODES = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}


def decode_png(data: bytes, limits: Limits = Limits()) -> Radiograph:
    """An 8- or 16-bit grayscale PNG -> Radiograph; size checked from the header before decoding."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            columns, rows = image.size
            limits.check(rows, columns, "the PNG")
            if image.mode not in _PNG_MODES:
                raise RequestError("unsupported_png",
                                   f"PNG mode {image.mode!r} is not a grayscale radiograph; "
                                   "send an 8- or 16-bit grayscale PNG (mode L or I;16)")
            image.load()
            array = np.asarray(image)
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise RequestError("corrupt_png",
                           f"the PNG cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if array.ndim != 2:
        raise RequestError("unsupported_png",
                           f"PNG decodes to shape {array.shape}, expected one channel")
    top = _PNG_MODES[image.mode]
    pixels = np.clip(array.astype(np.float32) / np.float32(top), 0.0, 1.0)
    return Radiograph(pixels=pixels, kind="png")


def decode_dicom(data: bytes, limits: Limits = Limits()) -> Radiograph:
    """DICOM bytes -> Radiograph through boneaug.io.dicom.read_xray; its rejection reason is kept.

    The reader checks the size limits from the header, before any pixel buffer exists (a
    compressed payload cannot expand past them)."""
    from boneaug.io.dicom import Rejection, read_xray

    try:
        image = read_xray(data, path="upload", max_pixels=limits.max_pixels,
                          max_side=limits.max_side)
    except Exception as exc:  # noqa: BLE001 - read_xray should not raise for bad data; never a 5xx
        raise RequestError("decode_error",
                           f"the DICOM cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if isinstance(image, Rejection):
        raise RequestError(image.reason, image.message)
    limits.check(image.rows, image.columns, "the DICOM image")
    return Radiograph(pixels=np.asarray(image.pixels, dtype=np.float32), kind="dicom", source=image)


# ---------------------------------------------------------------------------------------------
# boxes


def parse_box(text: str) -> Box | None:
    """'x0,y0,x1,y1' -> box; 'auto' -> None (the service picks one)."""
    text = text.strip()
    if text.lower() == "auto":
        return None
    parts = text.split(",")
    try:
        values = tuple(int(p.strip()) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise RequestError("bad_box", f"box {text[:80]!r} must be 'x0,y0,x1,y1' "
                           "(integers, pixels of the uploaded image, x1/y1 exclusive) or 'auto'")
    return values  # type: ignore[return-value]


def check_box(box: Sequence[int], shape: tuple[int, int]) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    rows, columns = shape
    if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
        raise RequestError("box_outside_image", f"box {[x0, y0, x1, y1]} is empty or outside the "
                           f"{rows}x{columns} image "
                           f"(need 0 <= x0 < x1 <= {columns}, 0 <= y0 < y1 <= {rows})")
    return x0, y0, x1, y1


def _area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.avg_pool2d(tensor, factor, ceil_mode=True)[0, 0].numpy()


def auto_box(
    image: np.ndarray,
    *,
    min_mean_intensity: float,
    rng: np.random.Generator,
    fraction: float = 0.5,
    min_side: int = 8,
) -> Box:
    """A lesion-sized square on the bone, chosen by the rule in the module docstring."""
    rows, columns = image.shape
    if columns > rows:  # landscape: the bone lies along x
        x0, y0, x1, y1 = auto_box(image.T, min_mean_intensity=min_mean_intensity, rng=rng,
                                  fraction=fraction, min_side=min_side)
        return y0, x0, y1, x1
    factor = max(1, math.ceil(max(rows, columns) / 512))
    small = _area_downsample(image, factor)  # (h, w)
    h, w = small.shape
    profile = small.mean(axis=0)  # (w,) column means
    k = max(1, w // 32) | 1
    smooth = np.convolve(np.pad(profile, k // 2, mode="edge"), np.ones(k) / k, mode="valid")
    brightest = int(np.argmax(smooth))
    half = smooth.min() + 0.5 * (smooth.max() - smooth.min())
    left, right = brightest, brightest + 1
    while left > 0 and smooth[left - 1] >= half:
        left -= 1
    while right < w and smooth[right] >= half:
        right += 1
    axis = (left + right) // 2  # the bone's axis: the middle of its run of bright columns
    bone_width = (right - left) * factor
    side = max(min_side, int(round(fraction * bone_width)))
    side = min(side, rows, columns)
    side_small = max(1, min(h, w, int(round(side / factor))))
    cx0 = min(max(axis - side_small // 2, 0), w - side_small)
    band = small[:, cx0:cx0 + side_small].mean(axis=1)  # (h,) row means inside the axis band
    window = np.convolve(band, np.ones(side_small) / side_small, mode="valid")  # (h - side + 1,)
    candidates = np.flatnonzero(window >= min_mean_intensity)
    if candidates.size == 0:
        raise RequestError("no_bone", f"no window of {side}x{side} px on the brightest column "
                           f"has mean intensity >= {min_mean_intensity} "
                           "(patch-making's bone threshold); "
                           "give the lesion box explicitly")
    cutoff = np.percentile(window[candidates], 75)
    best = candidates[window[candidates] >= cutoff]
    top = int(best[int(rng.integers(len(best)))])
    centre_x = (cx0 + side_small / 2) * factor
    centre_y = (top + side_small / 2) * factor
    bx0 = int(min(max(round(centre_x - side / 2), 0), columns - side))
    by0 = int(min(max(round(centre_y - side / 2), 0), rows - side))
    return bx0, by0, bx0 + side, by0 + side


# ---------------------------------------------------------------------------------------------
# geometry and models


def fit_pad(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """(H, W) -> target (h, w): aspect kept, centred, zero padding; ingestion's exact rule."""
    from boneaug.io.resize import fit_pad as fit_and_pad

    return fit_and_pad(image, target)[0]


def cut_patch(image: np.ndarray, box: Sequence[int], *, s: float, size: int,
              rng: np.random.Generator) -> tuple[Box, np.ndarray]:
    """SPEC 2's crop around `box` (side s x the box's larger side) -> (crop, (size, size) patch)."""
    try:
        crop = square_crop(box, image.shape, s, rng)
    except DataError as exc:
        raise RequestError("box_outside_image", str(exc)) from exc
    return crop, crop_resize(image, crop, size)


def run_translator(model: torch.nn.Module, patches: np.ndarray) -> np.ndarray:
    """(N, 1, S, S) float32 [0, 1] -> translated (N, 1, S, S) float32 [0, 1], in one batch on the
    model's device: the augmentation's own `translate_patches`, so both translate alike."""
    from boneaug.augment.translate import translate_patches

    return translate_patches(model, patches, batch_size=max(1, len(patches)))


def run_scorer(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) float32 [0, 1] -> lesion probabilities (N,) float32, in one batch on the
    model's device: the pseudo-labeller's own `score_images`, so both score alike."""
    from boneaug.augment.pseudolabel import score_images

    return score_images(model, images, batch_size=max(1, len(images)))


# ---------------------------------------------------------------------------------------------
# encoding


def encode_png(pixels: np.ndarray, *, bits: Literal[8, 16] = 8) -> bytes:
    """(H, W) float32 [0, 1] -> grayscale PNG bytes (8-bit for display, 16-bit to keep detail)."""
    from PIL import Image

    clipped = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0)
    if bits == 16:
        image = Image.fromarray(np.round(clipped * 65535.0).astype(np.uint16))
    else:
        image = Image.fromarray(np.round(clipped * 255.0).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# the whole path, in-process


@dataclass(frozen=True)
class LesionResult:
    box: Box
    crop: Box
    patch: np.ndarray  # (S, S) source patch
    translated: np.ndarray  # (S, S)
    blended: np.ndarray  # (H, W)
    probability: float


@dataclass(frozen=True)
class Recipe:
    """How one lesion is made (SPEC 2-4): the UNIT patch side, the patch rule's s, the blend
    exponent n, the classifier's input (height, width), the auto box's bone threshold and the
    blend mode (boneaug.augment.blend)."""

    size: int
    s: float
    n: float
    score_hw: tuple[int, int]
    min_mean_intensity: float
    blend: BlendMode = "alpha"

    @classmethod
    def from_config(cls, config: BoneaugConfig, body_part: str, *,
                    n: float | None = None) -> Recipe:
        """The config's recipe for `body_part`; `n` overrides the config's blend exponent."""
        return cls(size=config.patches.size, s=config.patches.body_parts[body_part].s,
                   n=config.augment.blend_n if n is None else n,
                   score_hw=(config.image.height, config.image.width),
                   min_mean_intensity=config.patches.min_mean_intensity,
                   blend=config.augment.blend)


def place_and_cut(image: np.ndarray, box: Sequence[int] | None, recipe: Recipe, *,
                  rng: np.random.Generator) -> tuple[Box, Box, np.ndarray]:
    """The client's box (checked) or an automatic one -> (box, crop, (S, S) patch)."""
    chosen = (auto_box(image, min_mean_intensity=recipe.min_mean_intensity, rng=rng)
              if box is None else check_box(box, image.shape))
    crop, patch = cut_patch(image, chosen, s=recipe.s, size=recipe.size, rng=rng)
    return chosen, crop, patch


def blend_and_fit(image: np.ndarray, translated: np.ndarray, crop: Sequence[int],
                  recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """Paste the translated (S, S) patch back -> (blended (H, W), classifier input score_hw)."""
    blended = paste_blended(image, translated, crop, n=recipe.n, mode=recipe.blend)
    return blended, fit_pad(blended, recipe.score_hw)


def synthesise(
    image: np.ndarray,
    box: Sequence[int] | None,
    recipe: Recipe,
    *,
    translate: Callable[[np.ndarray], np.ndarray],
    score: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> LesionResult:
    """Place (or pick), cut, translate, blend and score one lesion; `translate` maps (N,1,S,S) ->
    (N,1,S,S) and `score` maps (N,1,H,W) -> (N,) probabilities. The service runs the same steps
    with the two model calls going to its deployments."""
    chosen, crop, patch = place_and_cut(image, box, recipe, rng=rng)
    translated = translate(patch[None, None])[0, 0]
    blended, fitted = blend_and_fit(image, translated, crop, recipe)
    probability = float(score(fitted[None, None])[0])
    return LesionResult(chosen, crop, patch, translated, blended, probability)


def encode_result(image: Radiograph, result: LesionResult, fmt: Literal["dicom", "png"], *,
                  n: float, blend: BlendMode, models: dict[str, dict[str, str]],
                  creator: str = "boneaug-serve") -> tuple[bytes, str]:
    """The blended image as (bytes, media type): a derived DICOM carrying the provenance (source
    UID, models and versions, n, blend mode, score, box), or a 16-bit PNG."""
    check_format(image, fmt)
    if fmt == "png":
        return encode_png(result.blended, bits=16), "image/png"
    from boneaug.io.dicom import Derivation, encode_derived

    translator = models.get("translator", {})
    data = encode_derived(result.blended, Derivation(
        creator=creator, model_name=translator.get("name"),
        model_version=translator.get("version"),
        provenance=provenance(result, n=n, blend=blend, models=models)),
        source=image.source)
    return data, "application/dicom"


def check_format(image: Radiograph, fmt: Literal["dicom", "png"]) -> None:
    """A derived DICOM needs a DICOM upload to derive from."""
    if fmt == "dicom" and image.source is None:
        raise RequestError("dicom_needs_dicom_upload", "format=dicom derives a DICOM from the "
                           "uploaded DICOM; for a PNG upload ask for format=png")


def provenance(result: LesionResult, *, n: float, blend: BlendMode,
               models: dict[str, dict[str, str]]) -> dict[str, str | float]:
    """What a derived object records about how it was made (flat str/number values; the same
    keys as the chain's derived DICOMs: n, blend, score)."""
    out: dict[str, str | float] = {
        "box": ",".join(str(v) for v in result.box), "crop": ",".join(str(v) for v in result.crop),
        "n": float(n), "blend": blend, "score": round(float(result.probability), 6),
    }
    for role, ref in models.items():
        out[f"{role}_model"] = str(ref["name"])
        out[f"{role}_version"] = str(ref["version"])
    return out
