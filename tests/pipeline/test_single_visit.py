"""Single-visit processing against the simulator's truth (issue: ISR, characterize, calibrate)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import DetectorInfo, Exposure, PolynomialPsf
from apqa.errors import StageError
from apqa.pipeline.characterize import characterize
from apqa.pipeline.isr import run_isr
from apqa.pipeline.single_visit import SOURCE_COLUMNS, process_exposure

GRID = [(x, y) for x in (150.0, 1024.0, 1900.0) for y in (150.0, 2048.0, 3950.0)]


def _fwhm_errors(truth, result):
    return np.array([result.calexp.psf.fwhm_at(x, y) / truth.psf.fwhm_at(x, y) - 1
                     for x, y in GRID])


@pytest.mark.parametrize("name", ["processed_hits", "processed_cosmos"])
def test_psf_fwhm_within_one_percent(name, request):
    _, truth, result = request.getfixturevalue(name)
    assert isinstance(result.calexp.psf, PolynomialPsf)
    errors = _fwhm_errors(truth, result)
    assert np.max(np.abs(errors)) < 0.01, errors
    assert result.quality["n_psf_stars"] >= 10


@pytest.mark.parametrize("name", ["processed_hits", "processed_cosmos"])
def test_psf_residuals_consistent_with_noise(name, request):
    """Bright PSF stars minus the scaled model, in units of their noise: chi^2/dof ~ 1."""
    _, _, result = request.getfixturevalue(name)
    assert 0.8 < result.quality["psf_residual_chi2"] < 1.25
    stars = result.sources[result.sources["calib_psf_used"]]
    chi2_dof = stars["psfChi2"] / (stars["psfNdata"] - 1)
    assert 0.7 < np.median(chi2_dof) < 1.3


def _astrometric_rms_mas(truth, result) -> float:
    stars = truth.truth_sources[(truth.truth_sources["kind"] == "star")
                                & truth.truth_sources["in_image"]]
    ra, dec = result.calexp.wcs.all_pix2world(stars["x"], stars["y"], 0)
    d_ra = (ra - stars["ra"].to_numpy()) * np.cos(np.deg2rad(dec))
    d_dec = dec - stars["dec"].to_numpy()
    return float(np.sqrt(np.mean(d_ra**2 + d_dec**2)) * 3.6e6)


@pytest.mark.parametrize("name", ["processed_hits", "processed_cosmos"])
def test_astrometry_within_10_mas_of_truth(name, request):
    _, truth, result = request.getfixturevalue(name)
    assert result.calexp.wcs.sip is not None
    assert _astrometric_rms_mas(truth, result) <= 10.0
    # The header WCS was off by arcseconds; the fit is what brought it here.
    true_wcs = WCS(fits.Header.fromstring(truth.truth_visit["true_wcs"], sep="\n"))
    ra0, dec0 = truth.raw.wcs.all_pix2world([1024.0], [2048.0], 0)
    ra1, dec1 = true_wcs.all_pix2world([1024.0], [2048.0], 0)
    assert np.hypot((ra0 - ra1) * np.cos(np.deg2rad(dec1)), dec0 - dec1)[0] * 3.6e6 > 300


@pytest.mark.parametrize("name", ["processed_hits", "processed_cosmos"])
def test_zero_point_within_5_mmag_of_truth(name, request):
    _, truth, result = request.getfixturevalue(name)
    diff = result.calexp.photo_calib.zero_point - truth.truth_visit["zero_point"]
    assert abs(diff) < 0.005, diff
    assert result.quality["zero_point_err_mmag"] < 5
    # Calibrated stars carry their true fluxes in nJy.
    sources = result.sources[result.sources["calib_photometry_used"]]
    assert len(sources) >= 10


def test_crowded_field_completes_with_psf_within_3_percent(processed_crowded):
    _, truth, result = processed_crowded
    errors = _fwhm_errors(truth, result)
    assert np.max(np.abs(errors)) < 0.03, errors
    assert result.quality["n_sources"] > 3000


def test_cosmic_rays_saturation_and_defects_masked(processed_hits):
    sim, truth, result = processed_hits
    mask = result.calexp.mask
    cr_truth = np.zeros(result.calexp.shape, bool)
    crs = truth.cosmic_rays
    # Cosmic-ray pixels that stand > 10 sigma above the sky are all found.
    sky_sigma = np.sqrt(truth.truth_visit["sky_e"] + 49.0)
    strong = crs[crs["charge_e"] > 10 * sky_sigma]
    cr_truth[strong["y"], strong["x"]] = True
    cr_truth &= ~mask.is_set(["SAT", "BAD"])
    found = mask.is_set("CR")
    assert (found & cr_truth).sum() >= 0.99 * cr_truth.sum()
    all_cr = np.zeros_like(cr_truth)
    all_cr[crs["y"], crs["x"]] = True
    assert (found & ~all_cr).sum() < 30  # false cosmic-ray pixels
    assert mask.is_set("SAT")[truth.saturated].all()
    for row in sim.calibration(1).defects.itertuples():
        assert mask.is_set("BAD")[row.y0:row.y1 + 1, row.x0:row.x1 + 1].all()
    assert (mask.is_set("INTRP") == mask.is_set(["CR", "SAT", "BAD"])).all()


def test_source_table_columns_and_units(processed_hits):
    _, truth, result = processed_hits
    sources = result.sources
    assert list(sources.columns) == SOURCE_COLUMNS
    assert sources["sourceId"].is_unique
    # Bright isolated stars: psfFlux (nJy) matches the truth flux.
    stars = truth.truth_sources[(truth.truth_sources["kind"] == "star")
                                & truth.truth_sources["in_image"]
                                & ~truth.truth_sources["saturated"]]
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(sources[["x", "y"]].to_numpy()).query(stars[["x", "y"]].to_numpy())
    near = dist < 0.5
    matched = sources.iloc[idx[near]]
    good = ((matched["psfFlux"] / matched["psfFluxErr"] > 100).to_numpy()
            & ~matched[["flags_saturated", "flags_cr", "flags_bad"]].any(axis=1).to_numpy())
    ratio = matched["psfFlux"].to_numpy()[good] / stars["flux_njy"].to_numpy()[near][good]
    assert good.sum() >= 10
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert ((matched["extendedness"].to_numpy()[good]) == 0).mean() > 0.9


def _plain(image: np.ndarray, saturation: float = np.inf) -> Exposure:
    return Exposure(image, np.ones_like(image), wcs=None,
                    detector_info=DetectorInfo(gain=1.0, read_noise=1.0, saturation=saturation))


def test_pure_noise_has_too_few_stars():
    rng = np.random.default_rng(1)
    exp = run_isr(_plain(rng.normal(0, 1, (512, 512)).astype(np.float32))).exposure
    with pytest.raises(StageError, match=r"PSF stars|no sources"):
        characterize(exp)


def test_flat_image_is_a_stage_error():
    exp = run_isr(_plain(np.full((256, 256), 100.0, np.float32))).exposure
    with pytest.raises(StageError, match=r"flat|no sources"):
        characterize(exp)


def test_all_saturated_is_a_stage_error():
    exp = run_isr(_plain(np.full((256, 256), 5e4, np.float32), saturation=4e4)).exposure
    assert exp.mask.is_set("SAT").all()
    with pytest.raises(StageError):
        characterize(exp)


def test_wrong_refcat_region_is_a_stage_error(hits_sim, hits_exposure):
    refcat = hits_sim.refcat.copy()
    refcat["ra"] += 10.0  # ten degrees away
    bias, flat = hits_sim.calib_exposures(1)
    with pytest.raises(StageError, match=r"region|reference stars"):
        process_exposure(hits_exposure.raw, bias, flat, hits_sim.calibration(1).defects,
                         refcat)
