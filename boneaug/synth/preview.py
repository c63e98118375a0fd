"""Contact sheet of a cohort: what the DICOMs look like, with lesion boxes and captions.

Reads the files like a viewer would (pydicom; rescale -> window -> invert MONOCHROME1) so the
sheet also checks the encoding. The selection mixes lesions from obvious to subtle, negatives,
confounded images and fractures so a reviewer sees the range of the cohort.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from boneaug import storage
from boneaug.errors import DataError
from boneaug.synth.cohort import ANNOTATIONS

TILE_HEIGHT = 360
CAPTION = 46


def display_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """(H, W) float32 in [0, 1], bright = attenuating: modality rescale, linear VOI window
    (PS3.3 C.11.2.1.2.1, first window), MONOCHROME1 inverted. Without a window: min-max."""
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * np.float32(slope) + np.float32(intercept)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        out = (arr - np.float32(c - 0.5)) / np.float32(max(w - 1.0, 1.0)) + np.float32(0.5)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / max(hi - lo, 1e-6)
    out = np.clip(out, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _pick(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """Lesions spread over conspicuity, confounded images, fractures, then negatives."""
    pos = sorted((r for r in rows if r["label"] == 1 and not r["confounders"]),
                 key=lambda r: r["conspicuity"] or 0.0)
    conf = [r for r in rows if r["confounders"]]
    frac = [r for r in rows if r["task"] == "fracture"]
    neg = [r for r in rows if r["label"] == 0 and not r["confounders"] and r["task"] == "lesion"]
    chosen: list[dict] = []
    n_pos = min(len(pos), max(1, n * 5 // 12))
    if n_pos:
        idx = np.unique(np.round(np.linspace(0, len(pos) - 1, n_pos)).astype(int))
        chosen += [pos[i] for i in idx]
    for group, share in ((conf, n // 6), (frac, n // 6)):
        if group and share:
            take = rng.choice(len(group), size=min(share, len(group)), replace=False)
            chosen += [group[i] for i in sorted(take)]
    rest = [r for r in neg if r not in chosen]
    need = n - len(chosen)
    if need > 0 and rest:
        take = rng.choice(len(rest), size=min(need, len(rest)), replace=False)
        chosen += [rest[i] for i in sorted(take)]
    if len(chosen) < n:  # small cohorts: fill with whatever is left
        left = [r for r in rows if r not in chosen]
        chosen += left[: n - len(chosen)]
    return chosen[:n]


def _caption(row: dict) -> list[str]:
    line1 = f"{row['body_part']} {row['view']}  {row['image_id'].rsplit('-', 1)[-1]}"
    if row["task"] == "fracture":
        line2 = f"FRACTURE={row['fracture']}"
    elif row["label"]:
        line2 = f"LESION c={row['conspicuity']:.2f} {str(row['lesion_type'])[:14]}"
    else:
        line2 = "no lesion"
    line3 = ",".join(row["confounders"]) if row["confounders"] else row["photometric"]
    return [line1, line2, line3]


def contact_sheet(
    root_or_annotations_uri: str,
    out_png: str,
    *,
    n: int = 24,
    body_part: str | None = None,
    seed: int = 0,
) -> None:
    """Tile `n` images of the cohort (red lesion boxes, captions) into a PNG at `out_png`."""
    uri = root_or_annotations_uri.rstrip("/")
    if uri.endswith(".parquet"):
        ann_uri, root = uri, uri.rsplit("/", 1)[0]
    else:
        ann_uri, root = storage.join(uri, ANNOTATIONS), uri
    rows = storage.read_parquet(ann_uri).to_pylist()
    if body_part is not None:
        rows = [r for r in rows if r["body_part"] == body_part and r["task"] == "lesion"]
    if not rows:
        which = f" for body part {body_part!r}" if body_part else ""
        raise DataError(f"no images to preview in {ann_uri}{which}")
    picked = _pick(rows, n, np.random.default_rng(seed))
    aspect = picked[0]["columns"] / picked[0]["rows"]
    tw, th = max(64, int(round(TILE_HEIGHT * aspect))), TILE_HEIGHT
    cols = max(1, min(len(picked), int(math.ceil(math.sqrt(len(picked) * th / tw * 0.6)))))
    cols = min(cols, 12) if len(picked) > 12 else len(picked)
    grid_rows = int(math.ceil(len(picked) / cols))
    sheet = Image.new("RGB", (cols * tw, grid_rows * (th + CAPTION)), (24, 24, 24))
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:
        font = ImageFont.load_default()
    for k, row in enumerate(picked):
        ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(storage.join(root, row["key"]))))
        pix = display_pixels(ds)
        h, w = pix.shape
        scale = min(tw / w, th / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = Image.fromarray(np.rint(pix * 255).astype(np.uint8))
        img = img.resize(size, Image.Resampling.BILINEAR).convert("RGB")
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1 in row["boxes"] or []:
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1],
                           outline=(255, 40, 40), width=2)
        ox, oy = (k % cols) * tw, (k // cols) * (th + CAPTION)
        sheet.paste(img, (ox + (tw - img.width) // 2, oy))
        text = ImageDraw.Draw(sheet)
        for i, line in enumerate(_caption(row)):
            text.text((ox + 3, oy + th + 2 + 14 * i), line, fill=(235, 235, 235), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(out_png, buf.getvalue())
