"""Cosmic rays next to stars whose PSF has a sharp core on broad wings (JWST, HST): the stars'
own cores set the sharpness a cosmic ray must exceed, so no star core is taken for one."""

from __future__ import annotations

import numpy as np
import pytest

from apqa.datamodel import Exposure
from apqa.pipeline.cosmic_rays import psf_peak_contrast, sharpest_star_contrast
from apqa.pipeline.diffim.prepare import prepare_for_difference

SHAPE = (512, 512)
CORE_FWHM, WING_FWHM = 2.2, 10.0


def _gauss(xx, yy, x, y, fwhm):
    sigma = fwhm / 2.3548
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def _field(seed=0, n_stars=30, n_galaxies=150, n_crs=40):
    """Stars with a 60% core of FWHM 2.2 px on 40% wings of 10 px among more numerous bright
    galaxies (as in a deep extragalactic field: the sizes of bright sources say ~8 px),
    noise and single-pixel hits."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 5.0, SHAPE)
    yy, xx = np.mgrid[-20:21, -20:21]
    for x, y, f, fwhm in zip(rng.uniform(30, 482, n_galaxies), rng.uniform(30, 482, n_galaxies),
                             10 ** rng.uniform(4.0, 5.0, n_galaxies),
                             rng.uniform(7.0, 12.0, n_galaxies), strict=True):
        ix, iy = round(x), round(y)
        image[iy - 20:iy + 21, ix - 20:ix + 21] += f * _gauss(xx, yy, x - ix, y - iy, fwhm)
    xy = rng.uniform(30, 482, (n_stars, 2))
    flux = 10 ** rng.uniform(3.5, 5.5, n_stars)
    for (x, y), f in zip(xy, flux, strict=True):
        ix, iy = round(x), round(y)
        dx, dy = x - ix, y - iy
        stamp = 0.6 * _gauss(xx, yy, dx, dy, CORE_FWHM) + 0.4 * _gauss(xx, yy, dx, dy, WING_FWHM)
        image[iy - 20:iy + 21, ix - 20:ix + 21] += f * stamp
    crs = rng.integers(10, 502, (4 * n_crs, 2))
    far = np.min(np.hypot(crs[:, None, 0] - xy[None, :, 0], crs[:, None, 1] - xy[None, :, 1]),
                 axis=1) > 12
    crs = crs[far][:n_crs]
    image[crs[:, 1], crs[:, 0]] += rng.uniform(300, 2000, len(crs))
    return Exposure(image.astype(np.float32), np.full(SHAPE, 25.0, np.float32)), xy, flux, crs


def test_sharpest_star_contrast_is_the_cores_not_a_spike():
    exposure, xy, flux, _ = _field()
    bright = flux > 2e4
    contrast = sharpest_star_contrast(exposure.image, xy[bright, 0], xy[bright, 1])
    # Far sharper than a Gaussian of the stars' second-moment size, about the core's own.
    sigma2 = 0.6 * (CORE_FWHM / 2.3548) ** 2 + 0.4 * (WING_FWHM / 2.3548) ** 2
    assert contrast > 2 * psf_peak_contrast(2.3548 * np.sqrt(sigma2))
    # At most what a star centred on a pixel shows (as sampled here), and close to it: the
    # brightest stars include some nearly centred ones.
    centre = 0.6 * _gauss(0, 0, 0, 0, CORE_FWHM) + 0.4 * _gauss(0, 0, 0, 0, WING_FWHM)
    side = 0.6 * _gauss(1, 0, 0, 0, CORE_FWHM) + 0.4 * _gauss(1, 0, 0, 0, WING_FWHM)
    assert contrast == pytest.approx((centre - side) / centre, rel=0.1)
    # A hot pixel among the sources is not a star.
    image = exposure.image.copy()
    image[300, 301] += 1e5
    with_spike = sharpest_star_contrast(image, np.r_[xy[bright, 0], 301.2],
                                        np.r_[xy[bright, 1], 299.8])
    assert with_spike == contrast
    assert sharpest_star_contrast(exposure.image, np.array([]), np.array([])) == 0.0
    # A cosmic ray on one star's core makes it look sharper than any star: it does not move
    # the bound beyond the sharpest real core.
    each = [sharpest_star_contrast(exposure.image, [x], [y]) for x, y in xy[bright]]
    star = int(np.argmin(flux[bright]))
    x, y = np.rint(xy[bright][star]).astype(int)
    hit = exposure.image.copy()
    hit[y, x] *= 1.6  # contrast ~0.6: sharper than any star, not yet a lone hot pixel
    assert sharpest_star_contrast(hit, [xy[bright][star][0]], [xy[bright][star][1]]) > max(each)
    assert sharpest_star_contrast(hit, xy[bright, 0], xy[bright, 1]) <= max(each)


def test_star_cores_are_not_cosmic_rays_but_hits_are():
    exposure, xy, _, crs = _field(seed=1)
    prepared = prepare_for_difference(exposure)
    found = prepared.exposure.mask.is_set("CR")
    yy, xx = np.nonzero(found)
    near_star = np.min(np.hypot(xx[:, None] - xy[None, :, 0], yy[:, None] - xy[None, :, 1]),
                       axis=1) < 6
    assert near_star.sum() == 0
    assert found[crs[:, 1], crs[:, 0]].mean() >= 0.9
