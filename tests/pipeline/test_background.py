"""The binned sky background against a known sky: gradients, stars, masks, ragged edges."""

from __future__ import annotations

import numpy as np
import pytest

from apqa.datamodel import MoffatPsf, psf_stamps
from apqa.pipeline.background import clipped_rms, subtract_binned_background

SIGMA = 5.0


def _scene(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise on a tilted, curved sky with 600 stars per 1024^2: (image, true sky, star
    pixels)."""
    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = 200.0 + 30.0 * xx / width - 20.0 * (yy / height - 0.5) ** 2
    image = (sky + rng.normal(0, SIGMA, shape)).astype(np.float32)
    stars = np.zeros(shape, np.float32)
    n = int(600 * height * width / 1024**2)
    x, y = rng.uniform(10, width - 10, n), rng.uniform(10, height - 10, n)
    stamps, ix, iy = psf_stamps(MoffatPsf(width, height, [4.0]), x, y)
    half = stamps.shape[1] // 2
    for stamp, cx, cy, flux in zip(stamps, ix, iy, 10 ** rng.uniform(3, 5, n), strict=True):
        ys = slice(max(cy - half, 0), min(cy + half + 1, height))
        xs = slice(max(cx - half, 0), min(cx + half + 1, width))
        stars[ys, xs] += flux * stamp[ys.start - cy + half:ys.stop - cy + half,
                                      xs.start - cx + half:xs.stop - cx + half]
    return image + stars, sky, stars > SIGMA / 10


@pytest.mark.parametrize("shape", [(1024, 1024), (1001, 777)], ids=["square", "ragged"])
def test_sky_is_removed_to_a_small_fraction_of_the_noise(shape):
    image, sky, on_stars = _scene(shape, 1)
    masked = np.zeros(shape, bool)
    level = subtract_binned_background(image, masked)
    rms = clipped_rms(image, masked)
    free = ~on_stars
    # What is left of the sky in source-free pixels, on average and over 64-pixel patches.
    assert abs(float(image[free].mean())) < 0.03 * SIGMA
    patches = [image[y:y + 64, x:x + 64][free[y:y + 64, x:x + 64]].mean()
               for y in range(0, shape[0] - 63, 64) for x in range(0, shape[1] - 63, 64)]
    assert np.max(np.abs(patches)) < 0.15 * SIGMA
    # The level is the median of the meshes' values (as sep's globalback).
    assert level == pytest.approx(float(np.median(sky)), abs=SIGMA)
    assert rms == pytest.approx(SIGMA, rel=0.04)  # clipped: the stars do not widen it


def test_masked_pixels_are_not_measured():
    image, _, on_stars = _scene((1024, 1024), 2)
    masked = np.zeros(image.shape, bool)
    masked[300:380, 500:620] = True
    image[masked] = 1e6  # a saturated block: finite, and must not raise the sky around it
    subtract_binned_background(image, masked)
    near = np.zeros(image.shape, bool)
    near[280:400, 480:640] = True
    near &= ~masked & ~on_stars
    # sep at full resolution leaves 0.01-0.06 sigma here, binned 0.00-0.05 (six fields)
    assert abs(float(image[near].mean())) < 0.1 * SIGMA


def test_missing_pixels_may_be_nan():
    image, _, on_stars = _scene((512, 512), 3)
    masked = np.zeros(image.shape, bool)
    masked[:, :40] = True  # a missing strip, as a dithered image's edge
    image[masked] = np.nan
    level = subtract_binned_background(image, masked)
    rms = clipped_rms(image, masked)
    assert np.isfinite(level) and rms == pytest.approx(SIGMA, rel=0.04)
    assert np.isnan(image[masked]).all() and np.isfinite(image[~masked]).all()
    assert abs(float(image[~masked & ~on_stars].mean())) < 0.05 * SIGMA

