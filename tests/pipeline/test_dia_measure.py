"""DIASource detection and measurement on constructed difference images and pairs: noise-only
false detections against the Gaussian-field expectation, dipoles from misregistered stars,
trail length of a trailed source, and the APDB table contract."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from apqa.datamodel import Exposure, MoffatPsf, PhotoCalib, VisitInfo, psf_stamps
from apqa.pipeline.detect import DiaDetectionConfig, detect_dia_sources
from apqa.pipeline.diffim.subtract import DiffConfig, subtract
from apqa.pipeline.measure import measure_dia_sources
from tests.pipeline.synthetic_pairs import _render, make_pair


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    return w


def _noise_difference(shape, fwhm, seed):
    rng = np.random.default_rng(seed)
    psf = MoffatPsf(shape[1], shape[0], [fwhm], [0.0], [0.0], beta=3.5)
    image = rng.normal(0, 1, shape).astype(np.float32)
    return Exposure(image, np.ones(shape, np.float32), psf=psf, wcs=_wcs(shape),
                    photo_calib=PhotoCalib.from_zero_point(28.0),
                    visit_info=VisitInfo(7, 1, "r", "r", 60000.0, 30.0))


def _expected_regions(psf_image, threshold, n_pixels):
    """Expected number of excursions above ``threshold`` of white noise filtered by the PSF:
    the Euler characteristic density of a 2-d Gaussian field,
    sqrt(det L) * nu / (2 pi)^(3/2) * exp(-nu^2 / 2), with L the covariance of the normalized
    field's gradient (from the filter's derivatives)."""
    p = psf_image / psf_image.sum()
    gy, gx = np.gradient(p)
    norm = (p * p).sum()
    lam = np.array([[(gx * gx).sum(), (gx * gy).sum()], [(gx * gy).sum(), (gy * gy).sum()]])
    lam /= norm
    density = np.sqrt(np.linalg.det(lam)) * threshold / (2 * np.pi) ** 1.5 \
        * np.exp(-threshold**2 / 2)
    return density * n_pixels


@pytest.mark.parametrize("threshold", [4.0, 4.5])
def test_pure_noise_false_detections_match_gaussian_expectation(threshold):
    shape = (2048, 2048)
    diff = _noise_difference(shape, 4.0, seed=int(threshold * 10))
    found = detect_dia_sources(diff, DiaDetectionConfig(threshold=threshold, min_area=1))
    # Both polarities; the border where the filter runs off the image is not searched by the
    # expectation either (a few pixels out of 2048).
    expected = 2 * _expected_regions(diff.psf.image_at(1024, 1024), threshold, shape[0] * shape[1])
    n = len(found.sources)
    assert 0.5 * expected <= n <= 2.0 * expected, (n, expected)


def test_detections_respect_masked_pixels():
    shape = (512, 512)
    diff = _noise_difference(shape, 4.0, seed=3)
    # A hot bad column: huge values that must not become DIASources.
    diff.image[:, 200] = 500.0
    diff.mask.set("BAD", (slice(None), slice(200, 201)))
    found = detect_dia_sources(diff)
    assert not (np.abs(found.sources["x"] - 200) < 3).any()
    assert found.sky["x"].between(50, 462).all()


def test_misregistered_stars_become_dipoles():
    pair = make_pair(shape=(768, 768), n_stars=200, transient_flux=(), vanished_flux=(), seed=5)
    # Stars that moved by 2.5 px between the epochs (too few to bend the kernel). For much
    # smaller motions lobe separation and lobe flux are degenerate: only their product is known.
    rng = np.random.default_rng(9)
    n = 12
    x = rng.uniform(60, 700, n)
    y = rng.uniform(60, 700, n)
    flux = np.full(n, 3e4)
    pair.science.image += _render(pair.science.shape, pair.science.psf, x + 2.5, y, flux)
    pair.template.image += _render(pair.template.shape, pair.template.psf, x, y, flux)
    result, _ = subtract(pair.science, pair.template, DiffConfig())
    found = detect_dia_sources(result.difference)
    dia = measure_dia_sources(found, result.difference, pair.science, result.template).dia_sources
    hits = 0
    for xi, yi in zip(x, y, strict=True):
        near = dia[np.hypot(dia["x"] - (xi + 1.25), dia["y"] - yi) < 3]
        if len(near) == 1 and bool(near["isDipole"].iloc[0]):
            hits += 1
            assert near["dipoleLength"].iloc[0] == pytest.approx(2.5 * 0.2, rel=0.2)
            # From the negative lobe (template position) to the positive one: +x is east-to-west
            # with this WCS (RA decreases with x), so the bearing is 270 deg.
            assert abs(near["dipoleAngle"].iloc[0] - 270.0) < 15.0
    assert hits >= 10, hits


def test_trailed_source_length_within_ten_percent():
    shape = (400, 400)
    pair = make_pair(shape=shape, n_stars=120, transient_flux=(), vanished_flux=(), seed=8)
    # A source moving 25 px at 30 deg during the exposure: many PSF images along the segment.
    length_px, angle = 25.0, np.deg2rad(30.0)
    t = np.linspace(-0.5, 0.5, 401) * length_px
    xs, ys = 200 + t * np.cos(angle), 210 + t * np.sin(angle)
    pair.science.image += _render(shape, pair.science.psf, xs, ys, np.full(t.size, 8e4 / t.size))
    result, _ = subtract(pair.science, pair.template, DiffConfig())
    found = detect_dia_sources(result.difference)
    dia = measure_dia_sources(found, result.difference, pair.science, result.template).dia_sources
    near = dia[np.hypot(dia["x"] - 200, dia["y"] - 210) < 8]
    assert len(near) == 1
    row = near.iloc[0]
    assert row["trailLength"] == pytest.approx(length_px * 0.2, rel=0.10)
    assert row["trailFlux"] == pytest.approx(
        result.difference.photo_calib.to_njy(8e4), rel=0.05)


def test_psf_flux_and_centroids_on_a_synthetic_pair():
    rng = np.random.default_rng(1)
    # Enough transients for the robust width of the pulls to be known to ~5%.
    fluxes = tuple(10 ** rng.uniform(2.6, 3.5, 450))
    pair = make_pair(shape=(1600, 1600), n_stars=600, transient_flux=fluxes,
                     vanished_flux=(-3000.0, -2000.0), seed=4)
    result, _ = subtract(pair.science, pair.template, DiffConfig())
    found = detect_dia_sources(result.difference)
    dia = measure_dia_sources(found, result.difference, pair.science, result.template).dia_sources
    tx, ty, tf = pair.transients.T
    dist = np.hypot(dia["x"].to_numpy()[:, None] - tx, dia["y"].to_numpy()[:, None] - ty)
    best = dist.argmin(axis=0)
    ok = dist[best, np.arange(tx.size)] < 2
    assert ok.sum() >= 0.9 * tx.size
    got = dia.iloc[best[ok]]
    true_njy = pair.science.photo_calib.to_njy(tf[ok])
    pull = (got["psfFlux"].to_numpy() - true_njy) / got["psfFluxErr"].to_numpy()
    assert 1.4826 * np.median(np.abs(pull - np.median(pull))) == pytest.approx(1.0, abs=0.1)
    # The vanished sources are negative DIASources with negative fluxes.
    assert (got["isNegative"].to_numpy() == (tf[ok] < 0)).all()
    # Centroid errors consistent with the reported xErr.
    dx = (got["x"].to_numpy() - tx[ok]) / got["xErr"].to_numpy()
    assert 0.6 < 1.4826 * np.median(np.abs(dx)) < 1.6
    ra, dec = pair.science.pixel_to_sky(tx[ok], ty[ok])
    sep_arcsec = np.hypot((got["ra"] - ra) * np.cos(np.deg2rad(dec)), got["dec"] - dec) * 3600
    assert np.median(sep_arcsec) < 0.1
    assert got["scienceFlux"].notna().all() and got["templateFlux"].notna().all()


def test_sky_sources_measure_the_noise():
    pair = make_pair(shape=(1024, 1024), n_stars=300, transient_flux=(), vanished_flux=(),
                     seed=6)
    result, _ = subtract(pair.science, pair.template, DiffConfig())
    found = detect_dia_sources(result.difference, DiaDetectionConfig(n_sky_sources=300))
    sky = measure_dia_sources(found, result.difference, pair.science,
                              result.template).sky_sources
    assert len(sky) >= 250
    pull = sky["psfFlux"] / sky["psfFluxErr"]
    assert float(np.std(pull)) == pytest.approx(1.0, abs=0.12)


def test_psf_stamps_used_for_truth_are_normalized():
    psf = MoffatPsf(100, 100, [4.0], [0.0], [0.0], beta=3.5)
    stamps, _, _ = psf_stamps(psf, np.array([50.3]), np.array([49.7]))
    assert stamps.sum() == pytest.approx(1.0, abs=1e-6)
