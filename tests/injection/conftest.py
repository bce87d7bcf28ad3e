"""Synthetic exposures with a known, spatially varying PSF, WCS and calibration."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from apqa.datamodel import DetectorInfo, Exposure, MoffatPsf, PhotoCalib, VisitInfo

ZERO_POINT = 30.0
GAIN = 2.0
SCALE = 0.2  # arcsec per pixel


def make_wcs(width: int, height: int, rotation_deg: float = 0.0) -> WCS:
    """TAN WCS with north up and east left at ``rotation_deg`` = 0, SCALE arcsec per pixel."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [width / 2, height / 2]
    c, s = np.cos(np.deg2rad(rotation_deg)), np.sin(np.deg2rad(rotation_deg))
    wcs.wcs.cd = SCALE / 3600.0 * np.array([[-c, s], [s, c]])
    return wcs


def make_exposure(width: int = 1024, height: int = 2048, psf=None, rotation_deg: float = 0.0,
                  sky_variance: float = 25.0, visit: int = 410001, detector: int = 1) -> Exposure:
    """A blank exposure (zero image, constant variance) with everything injection needs."""
    psf = psf or MoffatPsf(width, height, fwhm_coeffs=[3.4, 0.08, -0.05, 0.1, 0.0, 0.1],
                           g1_coeffs=[0.02, 0.01, 0.0], g2_coeffs=[-0.01, 0.0, 0.015])
    return Exposure(
        np.zeros((height, width), np.float32), np.full((height, width), sky_variance, np.float32),
        psf=psf, wcs=make_wcs(width, height, rotation_deg),
        photo_calib=PhotoCalib.from_zero_point(ZERO_POINT),
        visit_info=VisitInfo(visit, detector, "g", "g DECam", 61000.0, 30.0),
        detector_info=DetectorInfo(gain=GAIN, read_noise=5.0))


@pytest.fixture
def blank():
    return make_exposure()


def counts_of(mag: np.ndarray) -> np.ndarray:
    """Image counts of AB magnitudes at ZERO_POINT."""
    return 10 ** (-0.4 * (np.asarray(mag) - ZERO_POINT))
