"""Patch geometry and planning (SPEC 2), as properties over many random cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boneaug.data.ingest import MAX_OBJECTS_PER_TASK, objects_per_task
from boneaug.data.patches import (
    ImageMeta,
    Placement,
    balance,
    box_iou,
    crop_resize,
    descriptor,
    keep_by_intensity,
    map_box,
    near_duplicate_pairs,
    nearest,
    plan_patches,
    spread_crops,
    square_crop,
)
from boneaug.errors import DataError


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    height = draw(st.integers(8, 3000))
    width = draw(st.integers(8, 3000))
    bw = draw(st.integers(1, min(width, height)))
    bh = draw(st.integers(1, min(width, height)))
    x0 = draw(st.integers(0, width - bw))
    y0 = draw(st.integers(0, height - bh))
    return (height, width), (x0, y0, x0 + bw, y0 + bh)


@settings(max_examples=400, deadline=None)
@given(case=image_and_box(), s=st.sampled_from([1.0, 1.5, 2.0]), seed=st.integers(0, 2**31))
def test_lesion_patch_contains_its_box_and_stays_inside(case, s: float, seed: int) -> None:
    (height, width), box = case
    x0, y0, x1, y1 = square_crop(box, (height, width), s, np.random.default_rng(seed))
    assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
    side = max(box[2] - box[0], box[3] - box[1])
    wanted = max(side, min(int(np.ceil(s * side)), height, width))
    # square unless the image is too narrow in one direction
    assert (x1 - x0, y1 - y0) == (min(wanted, width), min(wanted, height))


def test_crop_placement_is_random_but_seeded() -> None:
    box, hw = (100, 100, 120, 140), (1000, 500)
    a = [square_crop(box, hw, 2, np.random.default_rng(7)) for _ in range(3)]
    b = [square_crop(box, hw, 2, np.random.default_rng(s)) for s in range(20)]
    assert a[0] == a[1] == a[2]
    assert len(set(b)) > 5


def test_box_outside_the_image_is_an_error_that_says_so() -> None:
    with pytest.raises(DataError,
                       match=r"box \[0, 0, 50, 10\] is empty or outside the 20x40 image"):
        square_crop((0, 0, 50, 10), (20, 40), 1, np.random.default_rng(0))


def _placement(rows: int, cols: int, target: tuple[int, int] = (256, 128)) -> Placement:
    scale = min(target[0] / rows, target[1] / cols)
    return Placement(rows, cols, scale, (target[1] - cols * scale) / 2,
                     (target[0] - rows * scale) / 2)


@settings(max_examples=300, deadline=None)
@given(
    src_hw=st.tuples(st.integers(64, 3000), st.integers(64, 3000)),
    dst_hw=st.tuples(st.integers(64, 3000), st.integers(64, 3000)),
    frac=st.tuples(st.floats(0, 0.8), st.floats(0, 0.8), st.floats(0.05, 0.2),
                   st.floats(0.05, 0.2)),
)
def test_matched_crop_maps_boxes_through_the_classification_frame(src_hw, dst_hw, frac) -> None:
    src, dst = _placement(*src_hw), _placement(*dst_hw)
    fx, fy, fw, fh = frac
    box = (int(fx * src.width), int(fy * src.height),
           int(fx * src.width) + max(1, int(fw * src.width)),
           int(fy * src.height) + max(1, int(fh * src.height)))
    mapped = map_box(box, src, dst)
    assert 0 <= mapped[0] < mapped[2] <= dst.width and 0 <= mapped[1] < mapped[3] <= dst.height
    # where both images have content, the box lands on the same classification-frame spot (1 px
    # slack)
    for (sx, sy), (dx, dy) in (((box[0], box[1]), mapped[:2]), ((box[2], box[3]), mapped[2:])):
        cx, cy = sx * src.scale + src.pad_x, sy * src.scale + src.pad_y
        ex, ey = dx * dst.scale + dst.pad_x, dy * dst.scale + dst.pad_y
        if dst.pad_x <= cx <= dst.pad_x + dst.width * dst.scale:
            assert abs(cx - ex) <= dst.scale + 1e-6
        if dst.pad_y <= cy <= dst.pad_y + dst.height * dst.scale:
            assert abs(cy - ey) <= dst.scale + 1e-6


def test_map_box_between_a_double_size_image_is_a_doubling() -> None:
    small, large = _placement(500, 250), _placement(1000, 500)
    assert map_box((10, 20, 30, 60), small, large) == (20, 40, 60, 120)
    assert map_box((20, 40, 60, 120), large, small) == (10, 20, 30, 60)


@settings(max_examples=200, deadline=None)
@given(level=st.floats(0, 1), threshold=st.floats(0, 1))
def test_intensity_filter_drops_exactly_the_dark_patches(level: float, threshold: float) -> None:
    patch = np.full((16, 16), level, dtype=np.float32)
    assert keep_by_intensity(patch, threshold) == (float(patch.mean()) >= threshold)


def test_intensity_filter_uses_the_mean_not_the_max() -> None:
    patch = np.zeros((10, 10), np.float32)
    patch[0, :] = 1.0  # one bright row: mean 0.1
    assert not keep_by_intensity(patch, 0.15)
    patch[1, :] = 1.0  # mean 0.2
    assert keep_by_intensity(patch, 0.15)


def test_crop_resize_reads_the_crop_and_not_its_surroundings() -> None:
    image = np.zeros((100, 50), np.float32)
    image[10:30, 20:40] = 1.0
    out = crop_resize(image, (20, 10, 40, 30), 8)
    assert out.shape == (8, 8) and np.allclose(out, 1.0)
    assert crop_resize(image, (0, 50, 20, 70), 8).max() == 0.0


def test_descriptors_make_similar_images_nearest() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((64, 32)).astype(np.float32)
    other = rng.random((64, 32)).astype(np.float32)
    pool = np.stack([descriptor(other, 16), descriptor(base * 0.8 + 0.1, 16)])
    assert nearest(descriptor(base, 16)[None], pool, 1)[0, 0] == 1
    assert np.isclose(np.linalg.norm(pool[0]), 1.0)


def _meta(i: int, label: int, confounded: bool = False, rows: int = 400) -> ImageMeta:
    rng = np.random.default_rng(i)
    boxes = ((40, 100 + i, 70, 140 + i),) if label else ()
    return ImageMeta(f"im{i:03d}", f"dicom/x/im{i:03d}.dcm", label, boxes, confounded,
                     _placement(rows, 200), descriptor(rng.random((64, 32)).astype(np.float32), 8))


def test_plan_follows_spec_2() -> None:
    images = [_meta(i, 1, confounded=i == 0) for i in range(4)]
    images += [_meta(i, 0, confounded=i % 7 == 0) for i in range(10, 60)]
    plan = plan_patches(images, s=2, n=5, target_per_class=10, rng=np.random.default_rng(0))
    lesion_ids = {im.image_id for im in images if im.label}
    confounded = {im.image_id for im in images if im.confounded}
    # lesion patches from every lesion image, confounded ones included, enough to reach the target
    assert {t.image_id for t in plan.lesion} == lesion_ids and len(plan.lesion) == 12
    # up to n non-lesion images per lesion image, never confounded, cropped at the carried-over
    # box; 4 lesions x 5 matches = 20 candidates, of which 1.5 x target = 15 are cut
    per_lesion = {}
    for t in plan.normal:
        per_lesion.setdefault(t.matched_image_id, set()).add(t.image_id)
        assert t.image_id not in lesion_ids | confounded
    assert all(len(v) <= 5 for v in per_lesion.values()) and len(plan.normal) == 15
    # sources: clean negatives not used for translation
    sources = {t.image_id for t in plan.source}
    assert sources.isdisjoint(plan.translation_negatives) and sources.isdisjoint(confounded)
    assert (sources | plan.translation_negatives
            == {im.image_id for im in images if not im.label} - confounded)
    for t in (*plan.lesion, *plan.normal, *plan.source):
        x0, y0, x1, y1 = t.crop
        assert x0 <= t.box[0] and y0 <= t.box[1] and x1 >= t.box[2] and y1 >= t.box[3]


def test_plan_without_lesions_says_why() -> None:
    with pytest.raises(DataError, match="no lesion image"):
        plan_patches([_meta(1, 0)], s=1, n=2, target_per_class=4, rng=np.random.default_rng(0))


def test_balance_subsamples_the_larger_class() -> None:
    lesion, normal = balance([f"l{i}" for i in range(5)], [f"n{i}" for i in range(9)],
                             np.random.default_rng(0))
    assert len(lesion) == len(normal) == 5 and len(set(normal)) == 5


def test_balance_does_not_depend_on_the_order_ids_arrive_in() -> None:
    lesion = [f"l{i}" for i in range(5)]
    normal = [f"n{i}" for i in range(9)]
    first = balance(lesion, normal, np.random.default_rng(3))
    assert balance(lesion[::-1], normal[::-1], np.random.default_rng(3)) == first


def test_plan_does_not_depend_on_the_order_images_arrive_in() -> None:
    # a table read back from Ray Data's files comes in scheduling order; the plan must not follow it
    images = [_meta(i, 1) for i in range(4)] + [_meta(i, 0) for i in range(10, 40)]
    plans = [plan_patches(order, s=2, n=3, target_per_class=10, rng=np.random.default_rng(0))
             for order in (images, images[::-1])]
    assert plans[0] == plans[1]


def test_many_lesion_images_leave_negatives_for_augmentation_sources() -> None:
    # Table 1's humerus: n = 10 matches for each of hundreds of lesion images would use up a few
    # hundred negatives; only the normals balancing can use are cut, the rest are sources
    images = [_meta(i, 1) for i in range(60)] + [_meta(i, 0) for i in range(100, 300)]
    plan = plan_patches(images, s=2, n=10, target_per_class=40, rng=np.random.default_rng(0))
    assert len(plan.normal) == 60 and len(plan.translation_negatives) <= 60
    assert len(plan.source) >= 140


def test_box_iou_of_equal_disjoint_and_half_overlapping_boxes() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no pixel
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_near_duplicates_are_overlapping_crops_of_one_image_only() -> None:
    tasks = [("a", (0, 0, 10, 10)), ("a", (1, 1, 11, 11)),  # IoU 0.68: a pair
             ("a", (6, 6, 16, 16)),  # IoU 0.09 and 0.14 with the two above: none
             ("b", (0, 0, 10, 10))]  # the same crop, another image: never a pair
    assert near_duplicate_pairs(tasks) == 1
    assert near_duplicate_pairs(tasks, iou=0.05) == 3
    assert near_duplicate_pairs([]) == 0


@settings(max_examples=200, deadline=None)
@given(case=image_and_box(), s=st.sampled_from([1.0, 1.5, 2.0]), k=st.integers(1, 5),
       seed=st.integers(0, 2**31))
def test_spread_crops_follow_the_s_rule_and_one_is_square_crop(case, s: float, k: int,
                                                                 seed: int) -> None:
    (height, width), box = case
    crops = spread_crops(box, (height, width), s, k, np.random.default_rng(seed))
    assert len(crops) == k
    side = square_crop(box, (height, width), s, np.random.default_rng(seed))
    for x0, y0, x1, y1 in crops:
        assert x1 - x0 == y1 - y0 == side[2] - side[0]  # the s rule's side
        assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
        assert x1 <= width and y1 <= height
    if k == 1:  # the same draw as before spreading existed: k = 1 plans are unchanged
        assert crops == [side]


def test_spread_crops_of_one_lesion_overlap_less_than_independent_draws() -> None:
    box, hw = (500, 500, 540, 540), (2000, 2000)
    spread = independent = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        independent += near_duplicate_pairs(("a", square_crop(box, hw, 2.0, rng)) for _ in range(3))
        spread += near_duplicate_pairs(("a", c) for c in spread_crops(box, hw, 2.0, 3, rng))
    assert spread < 0.6 * independent
    # the 41 allowed x starts (460 ... 500) in thirds [0, 13), [13, 27), [27, 41): one crop each
    for seed in range(20):
        starts = sorted(c[0] - 460 for c in spread_crops(box, hw, 2.0, 3,
                                                         np.random.default_rng(seed)))
        assert 0 <= starts[0] < 13 <= starts[1] < 27 <= starts[2] < 41


def test_tasks_are_large_but_give_every_cpu_two() -> None:
    assert objects_per_task(1064, cpus=2) == MAX_OBJECTS_PER_TASK
    assert objects_per_task(20, cpus=2) == 5           # four tasks for two CPUs
    assert objects_per_task(2126, cpus=16) == 67       # 32 tasks over 16 CPUs
    assert objects_per_task(3, cpus=16) == 1
    assert objects_per_task(0, cpus=0) == 1
