"""Shared fixtures for the data-model tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import DetectorInfo, Exposure, Mask, PhotoCalib, VisitInfo
from apqa.sim.camera import detector_wcs
from apqa.sim.datasets import DECAM

#: Small image shape used everywhere a full detector is not needed.
SHAPE = (64, 128)


@pytest.fixture(scope="session")
def decam_wcs() -> WCS:
    """TAN-SIP WCS of simulated DECam detector 1 (2048 x 4096 px), slightly rotated."""
    return detector_wcs(DECAM, 1, 145.0, -3.0, 0.1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.fixture
def simple_wcs() -> WCS:
    """A plain TAN WCS for the small test images."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [64.5, 32.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    return wcs


@pytest.fixture
def make_exposure(rng: np.random.Generator, simple_wcs: WCS) -> Callable[..., Exposure]:
    """Factory for a fully described exposure with non-trivial pixels and mask."""

    def factory(**overrides) -> Exposure:
        image = rng.normal(100.0, 7.0, SHAPE).astype(np.float32)
        image[10, 20] = np.float32(1.2345678e5)  # a value with all float32 mantissa bits used
        variance = rng.uniform(40.0, 60.0, SHAPE).astype(np.float32)
        mask = Mask.zeros(SHAPE)
        mask.set("SAT", image > 1e5)
        mask.set("EDGE", (slice(None), slice(0, 3)))
        custom_bit = mask.add_plane("MY_CUSTOM")
        assert custom_bit == len(mask.planes) - 1
        mask.set("MY_CUSTOM", rng.random(SHAPE) < 0.05)
        kwargs = dict(
            image=image,
            variance=variance,
            mask=mask,
            wcs=simple_wcs,
            photo_calib=PhotoCalib(57.5439937337157, 0.8),
            visit_info=VisitInfo(
                visit=412345, detector=17, band="g",
                physical_filter="g DECam SDSS c0001 4720.0 1520.0",
                mjd=58123.456789012345, exposure_time=86.5, airmass=1.234,
                seeing=0.95, boresight_ra=145.25, boresight_dec=-3.125, rotation_angle=0.1,
            ),
            detector_info=DetectorInfo(gain=3.98, read_noise=7.25, saturation=46000.5,
                                       name="S3"),
        )
        kwargs.update(overrides)
        return Exposure(**kwargs)

    return factory


def _write_plain(path: Path, data: np.ndarray, cards: dict | None = None,
                 wcs: WCS | None = None) -> Path:
    header = wcs.to_header() if wcs is not None else fits.Header()
    for key, value in (cards or {}).items():
        header[key] = value
    fits.PrimaryHDU(np.asarray(data), header=header).writeto(path, overwrite=True)
    return path


@pytest.fixture
def write_plain() -> Callable[..., Path]:
    """Writer of single-HDU FITS images the way users bring them (astropy PrimaryHDU).

    ``write_plain(path, data, cards=None, wcs=None)``; ``cards`` go into the header.
    """
    return _write_plain
