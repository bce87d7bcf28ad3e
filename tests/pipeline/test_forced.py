"""Forced PSF photometry at DiaObject positions against injected truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from apqa.datamodel import Exposure, MoffatPsf, PhotoCalib, VisitInfo, psf_stamps
from apqa.datamodel.apdb_schema import empty_table
from apqa.errors import InputError
from apqa.pipeline.forced import forced_photometry

SHAPE = (300, 400)
SIGMA = 4.0


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [200.5, 150.5]
    w.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    return w


def _image(psf, x, y, counts, rng) -> np.ndarray:
    image = rng.normal(0.0, SIGMA, SHAPE)
    stamps, ix, iy = psf_stamps(psf, x, y)
    h = stamps.shape[1] // 2
    for k in range(len(x)):
        image[iy[k] - h:iy[k] + h + 1, ix[k] - h:ix[k] + h + 1] += counts[k] * stamps[k]
    return image


@pytest.fixture
def scene():
    """Difference and science exposures with point sources of known flux at known positions."""
    rng = np.random.default_rng(12)
    # A jittered grid 45 px apart: isolated sources (forced photometry does not deblend).
    gx, gy = np.meshgrid(np.arange(30, SHAPE[1] - 29, 45), np.arange(30, SHAPE[0] - 29, 45))
    n = gx.size
    x = gx.ravel() + rng.uniform(-3, 3, n)
    y = gy.ravel() + rng.uniform(-3, 3, n)
    diff_counts = rng.uniform(-2000, 4000, n)  # variables get fainter or brighter
    sci_counts = np.abs(diff_counts) + 3000.0
    psf = MoffatPsf(SHAPE[1], SHAPE[0], [4.0])
    calib = PhotoCalib.from_zero_point(28.0)
    info = VisitInfo(410007, 5, "r", "r", 60010.25, 30.0)

    def exposure(counts):
        exp = Exposure(_image(psf, x, y, counts, rng), np.full(SHAPE, SIGMA**2), psf=psf,
                       wcs=_wcs(), photo_calib=calib, visit_info=info)
        exp.metadata["APCORR"] = 1.0
        return exp

    difference, science = exposure(diff_counts), exposure(sci_counts)
    ra, dec = difference.pixel_to_sky(x, y)
    objects = empty_table("DiaObject", n)
    objects["diaObjectId"] = 7000 + np.arange(n)
    objects["ra"], objects["dec"] = ra, dec
    objects["nDiaSources"] = np.where(np.arange(n) % 5 == 0, 1, 3)
    return difference, science, objects, calib.to_njy(diff_counts), calib.to_njy(sci_counts)


def test_forced_fluxes_match_truth(scene):
    difference, science, objects, diff_njy, sci_njy = scene
    forced = forced_photometry(objects, difference, science, processed_mjd=60011.0)
    measured = objects["nDiaSources"].to_numpy() >= 2
    assert len(forced) == measured.sum()
    assert forced["diaObjectId"].tolist() == objects["diaObjectId"][measured].tolist()
    truth = pd.Series(diff_njy, index=objects["diaObjectId"]).loc[forced["diaObjectId"]]
    pull = (forced["psfFlux"].to_numpy() - truth.to_numpy()) / forced["psfFluxErr"].to_numpy()
    assert np.abs(pull).max() < 4.5 and abs(pull.mean()) < 0.5 and 0.7 < pull.std() < 1.3
    sci_truth = pd.Series(sci_njy, index=objects["diaObjectId"]).loc[forced["diaObjectId"]]
    sci_pull = (forced["scienceFlux"].to_numpy() - sci_truth.to_numpy()) / forced[
        "scienceFluxErr"].to_numpy()
    assert np.abs(sci_pull).max() < 4.5
    # PSF-fit error of white noise: sigma / sqrt(sum P^2), in nJy.
    stamp = difference.psf.image_at(200.0, 150.0)
    expected_err = difference.photo_calib.to_njy(SIGMA / np.sqrt(np.sum(stamp.astype(float)**2)))
    assert np.median(forced["psfFluxErr"]) == pytest.approx(expected_err, rel=0.02)
    assert (forced["visit"] == 410007).all() and (forced["detector"] == 5).all()
    assert (forced["band"] == "r").all() and (forced["midpointMjdTai"] == 60010.25).all()
    assert (forced["timeProcessedMjdTai"] == 60011.0).all()
    assert forced["diaForcedSourceId"].tolist() == [410007 * 10**8 + 5 * 10**5 + i
                                                    for i in range(len(forced))]
    np.testing.assert_array_equal(forced["ra"], objects["ra"][measured])


def test_objects_off_the_detector_are_not_measured(scene):
    difference, science, objects, _, _ = scene
    off = objects.iloc[:3].copy()
    off["diaObjectId"] = [1, 2, 3]
    off["nDiaSources"] = 5
    off["ra"] = off["ra"] + 0.1  # 1800 px away
    forced = forced_photometry(pd.concat([objects, off]), difference, science)
    assert not set(forced["diaObjectId"]) & {1, 2, 3}
    assert len(forced) == (objects["nDiaSources"] >= 2).sum()


def test_masked_pixels_are_left_out(scene):
    difference, science, objects, diff_njy, _ = scene
    x, y = difference.sky_to_pixel(objects["ra"].iloc[1], objects["dec"].iloc[1])
    ix, iy = round(float(x)), round(float(y))
    difference.mask.set("BAD", (slice(iy - 1, iy + 2), slice(ix - 1, ix + 2)))
    difference.image[iy - 1:iy + 2, ix - 1:ix + 2] = 1e6  # garbage under the mask
    forced = forced_photometry(objects, difference, science)
    row = forced[forced["diaObjectId"] == objects["diaObjectId"].iloc[1]].iloc[0]
    assert abs(row["psfFlux"] - diff_njy[1]) < 5 * row["psfFluxErr"]


def test_inputs_are_checked(scene):
    difference, science, objects, _, _ = scene
    with pytest.raises(InputError, match="lacks column 'nDiaSources'"):
        forced_photometry(objects.drop(columns="nDiaSources"), difference, science)
    difference.visit_info = None
    with pytest.raises(InputError, match="has no visit info"):
        forced_photometry(objects, difference, science)
    science.psf = None
    with pytest.raises(InputError, match="the science exposure has no psf"):
        forced_photometry(objects, difference, science)
