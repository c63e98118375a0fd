from __future__ import annotations

import numpy as np
import pytest

from boneaug.augment.blend import alpha_mask, blend_patch, paste_blended


@pytest.mark.parametrize("n", [0.5, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("size", [(33, 33), (65, 17), (5, 9)])
def test_alpha_mask_values(n: float, size: tuple[int, int]) -> None:
    h, w = size
    mask = alpha_mask(h, w, n=n)
    assert mask.shape == (h, w) and mask.dtype == np.float32
    assert mask[h // 2, w // 2] == pytest.approx(1.0)  # odd sizes: exact centre
    assert np.all(mask[0, :] == 0) and np.all(mask[-1, :] == 0)
    assert np.all(mask[:, 0] == 0) and np.all(mask[:, -1] == 0)
    assert np.allclose(mask, mask[::-1, :]) and np.allclose(mask, mask[:, ::-1])
    assert 0 <= mask.min() and mask.max() <= 1
    rng = np.random.default_rng(int(n * 10) + h)
    for _ in range(20):  # the formula at sampled pixels
        r, c = int(rng.integers(h)), int(rng.integers(w))
        i, j = -1 + 2 * r / (h - 1), -1 + 2 * c / (w - 1)
        expected = np.cos(abs(i) ** n * np.pi / 2) * np.cos(abs(j) ** n * np.pi / 2)
        assert mask[r, c] == pytest.approx(expected, abs=1e-6)


def test_larger_n_keeps_more_of_the_translation() -> None:
    assert alpha_mask(31, n=8).mean() > alpha_mask(31, n=2).mean() > alpha_mask(31, n=0.5).mean()


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="n must be > 0"):
        alpha_mask(8, n=0)
    with pytest.raises(ValueError, match="shapes differ"):
        blend_patch(np.zeros((4, 4)), np.zeros((4, 5)), n=2)
    with pytest.raises(ValueError,
                       match=r"crop \[0, 0, 20, 5\] is empty or outside the 10x10 image"):
        paste_blended(np.zeros((10, 10), np.float32), np.zeros((4, 4), np.float32), (0, 0, 20, 5),
                      n=2)


def test_paste_back_changes_only_the_crop_box() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((120, 60)).astype(np.float32)
    translated = np.zeros((32, 32), np.float32)
    crop = (10, 40, 43, 73)
    out = paste_blended(image, translated, crop, n=2)
    outside = np.ones_like(image, dtype=bool)
    outside[40:73, 10:43] = False
    # bit for bit
    assert np.array_equal(out[outside].view(np.uint32), image[outside].view(np.uint32))
    # the centre takes the translation (dark), the border keeps the original
    assert out[56, 26] < 0.05 and np.array_equal(out[40, 10:43], image[40, 10:43])
    assert not np.shares_memory(out, image)


def _grainy_bone(rng: np.random.Generator) -> np.ndarray:
    """A bright band with pixel-level grain, as a radiograph's shaft at full resolution."""
    cols = np.linspace(-1, 1, 96)
    band = 0.3 + 0.5 * (np.abs(cols) < 0.4)
    return np.clip(band[None, :] + rng.normal(0, 0.03, (160, 96)), 0, 1).astype(np.float32)


def test_detail_blend_adds_the_translators_change_and_keeps_the_grain() -> None:
    """mode "detail": a translation that only copies its source leaves the crop as it was; a
    lucent spot painted into the patch lands as a lucent spot, and the crop's pixel grain (the
    detail finer than the patch side, which "alpha" smooths away) survives it."""
    from boneaug.augment.blend import resize
    from boneaug.data.patches import crop_resize

    rng = np.random.default_rng(3)
    image = _grainy_bone(rng)
    crop = (16, 32, 80, 96)  # 64 px, translated at 16
    source = crop_resize(image, crop, 16)
    unchanged = paste_blended(image, source, crop, n=2, mode="detail")
    assert np.abs(unchanged - image).max() < 1e-5

    yy, xx = np.mgrid[:16, :16]
    spot = source - 0.25 * ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 12)  # a lucent disc
    detail = paste_blended(image, spot, crop, n=2, mode="detail")
    alpha = paste_blended(image, spot, crop, n=2, mode="alpha")
    centre = (slice(56, 72), slice(40, 56))
    region = image[32:96, 16:80]
    change = detail[32:96, 16:80] - region
    mask = alpha_mask(64, 64, n=2)
    expected = mask * resize(spot - source, 64, 64)
    assert np.abs(np.clip(region + expected, 0, 1) - detail[32:96, 16:80]).max() < 1e-5
    assert (image[centre] - detail[centre]).mean() > 0.2  # the spot is there, as in "alpha"
    assert (image[centre] - alpha[centre]).mean() > 0.2
    grain = (detail[centre] - resize(resize(detail[centre], 4, 4), 16, 16)).std()
    smoothed = (alpha[centre] - resize(resize(alpha[centre], 4, 4), 16, 16)).std()
    original = (image[centre] - resize(resize(image[centre], 4, 4), 16, 16)).std()
    assert grain == pytest.approx(original, rel=0.1) and smoothed < 0.5 * original
    assert np.abs(change).max() > 0.2


def test_unknown_blend_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"blend mode must be one of \('alpha', 'detail'\)"):
        paste_blended(np.zeros((10, 10), np.float32), np.zeros((4, 4), np.float32), (0, 0, 8, 8),
                      n=2, mode="poisson")  # type: ignore[arg-type]
