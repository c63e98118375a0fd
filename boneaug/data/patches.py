"""Patch-making (paper 3.2, SPEC 2) as pure functions: crops, box mapping, matching, planning.

Geometry: boxes and crops are [x0, y0, x1, y1] ints in pixels of the image they refer to,
x1/y1 exclusive. Every image also has a *placement* into the classification frame
(x' = x * scale + pad_x, the aspect-keeping fit with padding done at ingestion); two images of
different sizes are compared, and boxes carried from one to the other, in that common frame.

Similarity (SPEC 2 "n similar non-lesion images"): each image's descriptor is its classification
image average-pooled to `descriptor_size` rows (aspect kept), centred and L2-normalised, computed
once at ingestion. Similarity is the cosine (a dot product of descriptors), so matching every lesion
image against every candidate is one matrix product. For a lesion image we take its 3n nearest
non-lesion candidates and draw n of them at random: similar in view, position and scale, yet not
always the same few images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from boneaug.errors import DataError

Box = tuple[int, int, int, int]
NORMAL_SLACK = 1.5  # normal candidates cut per translation patch wanted (the intensity filter
#                     drops some, balancing trims the rest)


@dataclass(frozen=True)
class Placement:
    """Where an image sits in the classification frame: x' = x * scale + pad_x."""

    height: int
    width: int
    scale: float
    pad_x: float
    pad_y: float


def square_crop(box: Sequence[int], image_hw: tuple[int, int], s: float,
                rng: np.random.Generator, *, cell: tuple[int, int, int] = (0, 0, 1)) -> Box:
    """A random square of side s x (larger side of `box`) that contains `box`, inside the image.

    Where the image is too small for that side, the side shrinks to the image ("if image size
    permits"); it never shrinks below the box, so the box stays inside whenever it fits at all.
    `cell` = (i, j, k) draws the x start from the i-th and the y start from the j-th of k equal
    strata of the allowed starts (see `spread_crops`); the default draws from all of them.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image_hw
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise DataError(f"box {list(box)} is empty or outside the {height}x{width} image")
    side = max(x1 - x0, y1 - y0)
    side = max(side, min(int(math.ceil(s * side)), height, width))
    i, j, k = cell
    cx0, cx1 = _place(x0, x1, side, width, rng, (i, k))
    cy0, cy1 = _place(y0, y1, side, height, rng, (j, k))
    return cx0, cy0, cx1, cy1


def spread_crops(box: Sequence[int], image_hw: tuple[int, int], s: float, k: int,
                 rng: np.random.Generator) -> list[Box]:
    """`k` crops of one box, spread over the placements the s rule allows: crop c starts in
    stratum c of k along x and in stratum perm[c] along y (a Latin square), so that crops of one
    lesion differ in position instead of repeating it. At s = 2 and k = 3 a lesion's crops hold
    0.7-0.9 near-duplicate pairs (IoU >= 0.5) against 1.6-1.7 drawn independently (1000 seeds;
    the local femur had 60 such pairs among 129 lesion patches). k = 1 is `square_crop`."""
    if k == 1:
        return [square_crop(box, image_hw, s, rng)]
    rows = rng.permutation(k)
    return [square_crop(box, image_hw, s, rng, cell=(c, int(rows[c]), k)) for c in range(k)]


def _place(lo: int, hi: int, side: int, extent: int, rng: np.random.Generator,
           stratum: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """Start and end of a `side`-long interval holding [lo, hi) inside [0, extent), its start
    drawn from stratum i of k equal strata of the possible starts ((0, 1): any of them)."""
    side = min(side, extent)
    first = max(0, hi - side)
    last = min(lo, extent - side)
    if last < first:
        start = max(0, min(lo, extent - side))
    else:
        i, k = stratum
        count = last - first + 1
        lo_s, hi_s = first + i * count // k, first + (i + 1) * count // k
        start = int(rng.integers(lo_s, max(hi_s, lo_s + 1)))
    return start, start + side


def map_box(box: Sequence[float], src: Placement, dst: Placement) -> Box:
    """Carry a box from one image to another through the shared classification frame.

    The result is rounded outwards and clipped to `dst`; it is never empty.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    fx = [(x * src.scale + src.pad_x - dst.pad_x) / dst.scale for x in (x0, x1)]
    fy = [(y * src.scale + src.pad_y - dst.pad_y) / dst.scale for y in (y0, y1)]
    nx0 = min(max(int(math.floor(fx[0])), 0), dst.width - 1)
    ny0 = min(max(int(math.floor(fy[0])), 0), dst.height - 1)
    nx1 = max(min(int(math.ceil(fx[1])), dst.width), nx0 + 1)
    ny1 = max(min(int(math.ceil(fy[1])), dst.height), ny0 + 1)
    return nx0, ny0, nx1, ny1


def crop_resize(image: np.ndarray, crop: Sequence[int], size: int) -> np.ndarray:
    """(H, W) image -> the crop resized to (size, size) float32, antialiased."""
    x0, y0, x1, y1 = (int(v) for v in crop)
    region = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1], dtype=np.float32))
    if region.numel() == 0:
        raise DataError(f"crop {list(crop)} is empty in an image of shape {image.shape}")
    out = F.interpolate(region[None, None], size=(size, size), mode="bilinear",
                        antialias=region.shape[0] > size or region.shape[1] > size,
                        align_corners=False)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def keep_by_intensity(patch: np.ndarray, threshold: float) -> bool:
    """SPEC 2: a non-lesion patch with mean normalised intensity below `threshold` has no bone."""
    return float(patch.mean()) >= threshold


def descriptor(image: np.ndarray, rows: int) -> np.ndarray:
    """(H, W) classification image -> centred, unit-norm average-pooled thumbnail (flattened)."""
    height, width = image.shape
    cols = max(1, round(rows * width / height))
    pooled = F.adaptive_avg_pool2d(
        torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None],
        (rows, cols))[0, 0].flatten().numpy()
    pooled = pooled - pooled.mean()
    norm = float(np.linalg.norm(pooled))
    return (pooled / norm if norm > 0 else pooled).astype(np.float32)


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """(Q, D), (P, D) unit descriptors -> (Q, min(k, P)) indices into pool, most similar first."""
    if len(pool) == 0:
        return np.zeros((len(queries), 0), dtype=np.int64)
    sims = queries @ pool.T  # (Q, P) cosine similarity
    k = min(k, pool.shape[0])
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-sims, idx, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


@dataclass(frozen=True)
class ImageMeta:
    """What planning needs to know of one ingested image (no pixels)."""

    image_id: str
    key: str
    label: int
    boxes: tuple[Box, ...]  # lesion boxes in stored pixels
    confounded: bool
    placement: Placement
    descriptor: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class CropTask:
    """One patch to cut: which image, where, and why."""

    patch_id: str
    kind: str  # "lesion" | "normal" | "source"
    image_id: str
    key: str
    crop: Box
    s: float
    box: Box  # the lesion box, or the matched lesion box mapped into this image
    matched_image_id: str | None


@dataclass(frozen=True)
class PatchPlan:
    lesion: list[CropTask]
    normal: list[CropTask]  # candidates: more than needed, balanced after the intensity filter
    source: list[CropTask]
    translation_negatives: frozenset[str]  # image ids used for translation training


def plan_patches(
    images: Sequence[ImageMeta],
    *,
    s: float,
    n: int,
    target_per_class: int,
    rng: np.random.Generator,
    max_source_images: int | None = None,
) -> PatchPlan:
    """Decide every crop of SPEC 2 from metadata alone (train-split images of one body part).

    - lesion: every lesion image (confounders included), per box as many crops as reach
      `target_per_class` patches, spread over the placements s allows (`spread_crops`);
    - normal: for each lesion image, n of its 3n most similar clean non-lesion images, each cropped
      at the lesion box carried over (one crop per box); of these, a random NORMAL_SLACK x
      `target_per_class` are kept;
    - source: clean non-lesion images not used for translation, each cropped at the box of its
      most similar lesion image.
    """
    # the rng draws follow the images' order, and a table read back from Ray Data's files comes in
    # scheduling order: sorting makes the plan a function of the images and the seed alone
    images = sorted(images, key=lambda im: im.image_id)
    lesions = [im for im in images if im.label == 1 and im.boxes]
    clean_neg = [im for im in images if im.label == 0 and not im.confounded]
    if not lesions:
        raise DataError("no lesion image with a box in the training split: cannot make patches")
    if not clean_neg:
        raise DataError("no non-lesion image without confounders in the training split")
    n_boxes = sum(len(im.boxes) for im in lesions)
    per_box = max(1, math.ceil(target_per_class / n_boxes))

    lesion_tasks = [
        CropTask(f"{im.image_id}-l{b}-{c}", "lesion", im.image_id, im.key, crop, s, box, None)
        for im in lesions
        for b, box in enumerate(im.boxes)
        for c, crop in enumerate(spread_crops(box, (im.placement.height, im.placement.width),
                                              s, per_box, rng))
    ]

    neg_desc = np.stack([im.descriptor for im in clean_neg])
    les_desc = np.stack([im.descriptor for im in lesions])
    near = nearest(les_desc, neg_desc, 3 * n)
    normal_tasks: list[CropTask] = []
    used: set[str] = set()
    for lesion, candidates in zip(lesions, near, strict=True):
        chosen = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
        for j in sorted(int(c) for c in chosen):
            neg = clean_neg[j]
            used.add(neg.image_id)
            for b, box in enumerate(lesion.boxes):
                mapped = map_box(box, lesion.placement, neg.placement)
                crop = square_crop(mapped, (neg.placement.height, neg.placement.width), s, rng)
                normal_tasks.append(CropTask(f"{neg.image_id}-n-{lesion.image_id}-{b}", "normal",
                                             neg.image_id, neg.key, crop, s, mapped,
                                             lesion.image_id))

    if len(normal_tasks) > (keep := math.ceil(NORMAL_SLACK * target_per_class)):
        # every lesion image matched, but only as many normals cut as balancing can use: the
        # negatives left over stay available as augmentation sources (with Table 1's positives
        # and n = 10, the matches would otherwise use up every negative of a few hundred)
        picked = rng.choice(len(normal_tasks), size=keep, replace=False)
        normal_tasks = [normal_tasks[i] for i in sorted(picked)]
        used = {t.image_id for t in normal_tasks}
    sources = [im for im in clean_neg if im.image_id not in used]
    if max_source_images is not None and len(sources) > max_source_images:
        keep = rng.choice(len(sources), size=max_source_images, replace=False)
        sources = [sources[i] for i in sorted(keep)]
    source_tasks: list[CropTask] = []
    if sources:
        best = nearest(np.stack([im.descriptor for im in sources]), les_desc, 1)[:, 0]
        for src, j in zip(sources, best, strict=True):
            lesion = lesions[int(j)]
            b = int(rng.integers(len(lesion.boxes)))
            mapped = map_box(lesion.boxes[b], lesion.placement, src.placement)
            crop = square_crop(mapped, (src.placement.height, src.placement.width), s, rng)
            source_tasks.append(CropTask(f"{src.image_id}-s", "source", src.image_id, src.key,
                                         crop, s, mapped, lesion.image_id))
    return PatchPlan(lesion_tasks, normal_tasks, source_tasks, frozenset(used))


def balance(lesion_ids: Sequence[str], normal_ids: Sequence[str],
            rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Class-balanced translation sets: subsample the larger class to the smaller one's size."""
    size = min(len(lesion_ids), len(normal_ids))

    def pick(ids: Sequence[str]) -> list[str]:
        ordered = sorted(ids)  # the draw must not depend on the order the ids arrived in
        chosen = rng.choice(len(ordered), size=size, replace=False)
        return sorted(ordered[i] for i in chosen)

    return pick(lesion_ids), pick(normal_ids)


NEAR_DUPLICATE_IOU = 0.5  # two crops of one image that overlap this much show the same content


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def near_duplicate_pairs(crops: Iterable[tuple[str, Sequence[int]]],
                         iou: float = NEAR_DUPLICATE_IOU) -> int:
    """Pairs of patches in one set, given as (image id, crop), cut from the same image with
    crops overlapping >= `iou`: the same lesion (or stretch of bone) shown twice, which a
    discriminator can memorise. Crops of different images never count, however alike."""
    by_image: dict[str, list[Sequence[int]]] = {}
    for image_id, crop in crops:
        by_image.setdefault(image_id, []).append(crop)
    return sum(box_iou(crops[i], crops[j]) >= iou
               for crops in by_image.values()
               for i in range(len(crops)) for j in range(i + 1, len(crops)))
