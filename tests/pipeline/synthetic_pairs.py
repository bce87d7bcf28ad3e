"""Aligned science/template pairs with known PSFs, noise and transients, for differencing tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from apqa.datamodel import Exposure, MoffatPsf, PhotoCalib, VisitInfo, psf_stamps


@dataclass
class Pair:
    science: Exposure
    template: Exposure
    stars: np.ndarray  # (n, 3): x, y, flux in science counts
    transients: np.ndarray  # (n, 3): x, y, flux (science counts); negative: template only


def _wcs(shape: tuple[int, int]) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    return w


def _render(shape, psf, xs, ys, fluxes) -> np.ndarray:
    image = np.zeros(shape, np.float64)
    stamps, ix, iy = psf_stamps(psf, xs, ys)
    h = stamps.shape[1] // 2
    for k in range(len(xs)):
        y0, x0 = iy[k] - h, ix[k] - h
        image[y0:y0 + stamps.shape[1], x0:x0 + stamps.shape[2]] += fluxes[k] * stamps[k]
    return image


def make_pair(shape=(512, 512), fwhm_science=4.5, fwhm_template=3.5, sigma_science=5.0,
              sigma_template=3.0, n_stars=250, flux_ratio=1.0, transient_flux=(3000.0,),
              vanished_flux=(-3000.0,), seed=0) -> Pair:
    """Aligned pair; the template's counts are ``flux_ratio`` times the science's."""
    rng = np.random.default_rng(seed)
    height, width = shape
    margin = 30
    xs = rng.uniform(margin, width - margin, n_stars)
    ys = rng.uniform(margin, height - margin, n_stars)
    fluxes = 10 ** rng.uniform(2.5, 5.0, n_stars)
    psf_s = MoffatPsf(width, height, [fwhm_science, 0.02 * fwhm_science], [0.02, 0.01],
                      [-0.01], beta=3.5)
    psf_t = MoffatPsf(width, height, [fwhm_template, -0.02 * fwhm_template], [-0.01],
                      [0.02, 0.0, 0.01], beta=3.5)
    tx = rng.uniform(margin, width - margin, len(transient_flux) + len(vanished_flux))
    ty = rng.uniform(margin, height - margin, tx.size)
    tf = np.array(list(transient_flux) + list(vanished_flux), float)
    sci_img = _render(shape, psf_s, xs, ys, fluxes)
    tmp_img = _render(shape, psf_t, xs, ys, fluxes * flux_ratio)
    appear = tf > 0
    sci_img += _render(shape, psf_s, tx[appear], ty[appear], tf[appear])
    tmp_img += _render(shape, psf_t, tx[~appear], ty[~appear], -tf[~appear] * flux_ratio)
    sci_img += rng.normal(0, sigma_science, shape)
    tmp_img += rng.normal(0, sigma_template, shape)
    wcs = _wcs(shape)

    def exposure(image, sigma, psf, zp, visit):
        return Exposure(image, np.full(shape, sigma**2), psf=psf, wcs=wcs,
                        photo_calib=PhotoCalib.from_zero_point(zp),
                        visit_info=VisitInfo(visit, 1, "g", "g", 60000.0 + visit, 30.0))

    zp = 28.0
    zp_t = zp + 2.5 * np.log10(flux_ratio)  # more counts for the same flux: larger zero point
    return Pair(exposure(sci_img, sigma_science, psf_s, zp, 2),
                exposure(tmp_img, sigma_template, psf_t, zp_t, 1),
                np.column_stack([xs, ys, fluxes]), np.column_stack([tx, ty, tf]))
