"""The simulator's truth is self-consistent: noise, fluxes, positions, artefacts, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel.photocalib import abmag_to_njy
from apqa.sim import SimulationConfig, SurveySimulator
from apqa.sim.astrometry import apparent_positions
from apqa.sim.catalogs import MJD_J2016


def _normalized_residuals(sim, exp):
    """(raw - bias - expected) / sqrt(stated variance) on pixels free of CRs and saturation."""
    calib = sim.calibration(exp.raw.visit_info.detector)
    gain = exp.raw.detector_info.gain
    resid = (exp.raw.image - calib.bias - exp.expected_electrons / gain) / np.sqrt(
        exp.raw.variance)
    clean = ~exp.saturated
    clean[exp.cosmic_rays["y"].to_numpy(), exp.cosmic_rays["x"].to_numpy()] = False
    return resid[clean]


def test_noise_matches_stated_variance_hits(hits_sim, hits_exposure):
    resid = _normalized_residuals(hits_sim, hits_exposure)
    assert resid.size > 8_000_000
    assert abs(np.std(resid) - 1.0) < 0.02
    assert abs(np.mean(resid)) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cosmos-sim", "crowded-sim"])
def test_noise_matches_stated_variance_other_datasets(dataset):
    sim = SurveySimulator(SimulationConfig(dataset=dataset, n_visits=1, seed=5))
    exp = sim.exposure(sim.plans[-1].visit, 1)
    resid = _normalized_residuals(sim, exp)
    assert abs(np.std(resid) - 1.0) < 0.02


def _weighted_centroid(img: np.ndarray, x0: float, y0: float, sigma: float, half: int = 12):
    """Iterative Gaussian-weighted centroid: unbiased for point-symmetric PSFs."""
    ix, iy = round(x0), round(y0)
    stamp = img[iy - half:iy + half + 1, ix - half:ix + half + 1].astype(np.float64)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    cx, cy = x0 - ix, y0 - iy
    for _ in range(50):
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)) * stamp
        nx, ny = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        if abs(nx - cx) < 1e-7 and abs(ny - cy) < 1e-7:
            break
        cx, cy = nx, ny
    return ix + cx, iy + cy


def _centroid_offsets(sim, exp, min_snr: float) -> list[tuple[float, float]]:
    calib = sim.calibration(exp.raw.visit_info.detector)
    with np.errstate(divide="ignore", invalid="ignore"):  # dead columns have zero response
        image = (exp.raw.image - calib.master_bias) / calib.master_flat
    image -= exp.truth_visit["sky_adu"]
    true_wcs = WCS(fits.Header.fromstring(exp.truth_visit["true_wcs"], sep="\n"))
    stars = sim.sky.stars.set_index("object_id")
    truth = exp.truth_sources
    cand = truth[(truth["kind"] == "star") & truth["in_image"] & ~truth["saturated"]
                 & (truth["x"] > 30) & (truth["x"] < exp.raw.width - 30)
                 & (truth["y"] > 30) & (truth["y"] < exp.raw.height - 30)]
    gain = exp.raw.detector_info.gain
    sigma = exp.psf.fwhm / 2.3548
    rows = []
    for row in cand.itertuples():
        counts = row.flux_njy / exp.photo_calib.calibration_mean
        n_eff = 4 * np.pi * sigma**2
        snr = counts / np.sqrt(counts / gain + n_eff * (exp.truth_visit["sky_adu"] / gain
                                                        + (exp.raw.detector_info.read_noise
                                                           / gain) ** 2))
        if snr < min_snr:
            continue
        # Isolated: no other source brighter than 0.1% of this one within 25 px.
        d = np.hypot(truth["x"] - row.x, truth["y"] - row.y)
        others = truth[(d < 25) & (d > 0) & (truth["flux_njy"] > 1e-3 * row.flux_njy)]
        if len(others):
            continue
        star = stars.loc[row.object_id]
        ra, dec = apparent_positions(star.ra, star.dec, star.pmra, star.pmdec, star.parallax,
                                     MJD_J2016, exp.truth_visit["mjd"])
        x_true, y_true = true_wcs.all_world2pix(ra, dec, 0, tolerance=1e-10)
        x_c, y_c = _weighted_centroid(image, float(x_true), float(y_true), sigma)
        rows.append((x_c - x_true, y_c - y_true))
    return rows


def test_star_positions_through_wcs(hits_sim, hits_exposure):
    """Bright isolated stars, centroided on the calibrated noisy images of all three visits,
    land where the truth WCS puts their catalogue positions (proper motion and parallax applied
    at each epoch) to 0.02 px rms."""
    rows = _centroid_offsets(hits_sim, hits_exposure, 200)
    for visit in (400001, 410002):
        rows += _centroid_offsets(hits_sim, hits_sim.exposure(visit, 1), 200)
    offsets = np.array(rows)
    assert len(offsets) >= 20, f"only {len(offsets)} bright isolated stars"
    rms = np.sqrt(np.mean(offsets**2, axis=0))
    assert np.all(rms < 0.02), rms


@pytest.mark.parametrize(("dataset", "low", "high"), [
    ("hits-sim", 23.3, 24.8), ("cosmos-sim", 25.0, 26.5), ("crowded-sim", 22.5, 24.2)])
def test_photometric_scale_and_depth(dataset, low, high):
    """Source electrons follow the dataset's zero point, and the 5-sigma point-source depth is
    the one of the survey it imitates (DECam 60-90 s, HSC 200 s)."""
    sim = SurveySimulator(SimulationConfig(dataset=dataset, n_visits=1))
    plan = sim.plans[-1]
    spec = sim.spec
    exp = sim.exposure(plan.visit, 1)
    tv = exp.truth_visit
    zp_e = (spec.zp_e_per_s + 2.5 * np.log10(plan.exptime)
            - spec.extinction * (plan.airmass - 1) - plan.cloud_extinction)
    # A 20th-magnitude source: electrons from the zero point equal gain x calibrated counts.
    electrons = 10 ** (-0.4 * (20.0 - zp_e))
    counts = abmag_to_njy(20.0) / exp.photo_calib.calibration_mean
    assert counts * spec.camera.gain == pytest.approx(electrons, rel=1e-9)
    sigma_px = plan.seeing / spec.camera.pixel_scale / 2.3548
    noise_e = np.sqrt(4 * np.pi * sigma_px**2 * (tv["sky_e"] + spec.camera.read_noise**2))
    depth = zp_e - 2.5 * np.log10(5 * noise_e)
    assert low < depth < high


def test_point_source_fluxes_in_noiseless_image(hits_sim, hits_exposure):
    """Each isolated star's light in the noiseless image sums to its truth flux."""
    exp = hits_exposure
    calib = hits_sim.calibration(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        model = exp.expected_electrons / calib.response
    sky_e = exp.truth_visit["sky_e"]
    gain = exp.raw.detector_info.gain
    truth = exp.truth_sources
    half = exp.psf.stamp_size() // 2 + 1
    checked = 0
    for row in truth[(truth["kind"] == "star") & truth["in_image"]].itertuples():
        ix, iy = round(row.x), round(row.y)
        if not (half < ix < exp.raw.width - half and half < iy < exp.raw.height - half):
            continue
        d = np.hypot(truth["x"] - row.x, truth["y"] - row.y)
        # Neighbours whose light can reach the box must be negligible (< 0.05% each).
        if ((d < 2.5 * half) & (d > 0) & (truth["flux_njy"] > 5e-4 * row.flux_njy)).any():
            continue
        box = model[iy - half:iy + half + 1, ix - half:ix + half + 1]
        if not np.isfinite(box).all():
            continue  # a dead column crosses this star
        measured = (box.sum() - sky_e * box.size) / gain
        expected = row.flux_njy / exp.photo_calib.calibration_mean
        assert measured == pytest.approx(expected, rel=3e-3, abs=0.5)
        checked += 1
    assert checked >= 5


def test_galaxy_fluxes_conserved(hits_sim, hits_exposure):
    """The whole image holds exactly the flux of all sources (sky removed), up to edge losses."""
    exp = hits_exposure
    calib = hits_sim.calibration(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        model = exp.expected_electrons / calib.response
    good = np.isfinite(model) & (calib.response > 0.2)
    truth = exp.truth_sources
    margin = 60
    inner = truth[(truth["x"] > margin) & (truth["x"] < exp.raw.width - margin)
                  & (truth["y"] > margin) & (truth["y"] < exp.raw.height - margin)]
    # Compare within an inner box whose border holds no source at all.
    box = np.zeros_like(good)
    box[margin:-margin, margin:-margin] = True
    total = (model[box & good].sum() - exp.truth_visit["sky_e"] * (box & good).sum())
    total /= exp.raw.detector_info.gain
    expected = (inner["flux_njy"].sum() / exp.photo_calib.calibration_mean)
    # Dead/low columns and sources straddling the box edge blur this by well under 2%.
    assert total == pytest.approx(expected, rel=0.02)


def test_cosmic_rays_and_saturation_in_raw(hits_sim, hits_exposure):
    exp = hits_exposure
    calib = hits_sim.calibration(1)
    gain = exp.raw.detector_info.gain
    crs = exp.cosmic_rays
    assert exp.truth_visit["n_cosmic_rays"] > 10
    excess = (exp.raw.image - calib.bias - exp.expected_electrons / gain)[crs["y"], crs["x"]]
    unsaturated = ~exp.saturated[crs["y"], crs["x"]]
    ratio = excess[unsaturated] / (crs["charge_e"].to_numpy()[unsaturated] / gain)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    # Saturated stars: cores at full well, bleed trails along columns.
    sat = exp.truth_sources[exp.truth_sources["saturated"]]
    if len(sat):
        full = exp.raw.image - calib.bias >= 0.999 * exp.raw.detector_info.saturation
        assert full.sum() > 0
        ys, _ = np.nonzero(exp.saturated)
        assert (np.ptp(ys) if len(ys) else 0) >= 1


def test_reference_catalog_and_proper_motion(hits_sim, hits_exposure):
    refcat = hits_sim.refcat
    for column in ("source_id", "ra", "dec", "ra_error", "dec_error", "pmra", "pmdec",
                   "parallax", "parallax_error", "ref_epoch", "g_mag", "r_mag"):
        assert column in refcat
    assert (refcat["ref_epoch"] == 2016.0).all()
    assert refcat["g_mag"].max() < 20.8
    # Truth positions at the epoch have moved from the 2016.0 catalogue by ~pm * 9.9 yr.
    truth = hits_exposure.truth_sources.set_index("object_id")
    ref = refcat.merge(truth[["ra", "dec"]].rename(columns=lambda c: f"{c}_epoch"),
                       left_on="source_id", right_index=True)
    assert len(ref) > 10
    ddec_mas = (ref["dec_epoch"] - ref["dec"]) * 3.6e6
    years = (hits_exposure.truth_visit["mjd"] - MJD_J2016) / 365.25
    assert years > 9
    pred = ref["pmdec"] * years
    assert np.corrcoef(ddec_mas, pred)[0, 1] > 0.95
    assert np.sqrt(np.mean(ddec_mas**2)) > 30  # ignoring proper motion would cost > 30 mas


def test_truth_tables_and_sky_content(hits_sim, hits_exposure):
    truth = hits_exposure.truth_sources
    kinds = set(truth["kind"])
    assert {"star", "galaxy"} <= kinds
    objects = hits_sim.sky.objects_table()
    assert objects["object_id"].is_unique
    transients = hits_sim.sky.transients
    assert (transients["host_id"] >= 0).mean() > 0.4  # many transients are on hosts
    hosted = transients[transients["host_id"] >= 0]
    hosts = hits_sim.sky.galaxies.set_index("object_id").loc[hosted["host_id"]]
    sep = np.hypot((hosted["ra"].to_numpy() - hosts["ra"].to_numpy())
                   * np.cos(np.deg2rad(hosts["dec"].to_numpy())),
                   hosted["dec"].to_numpy() - hosts["dec"].to_numpy()) * 3600
    assert np.median(sep / hosts["half_light_radius"].to_numpy()) < 3
    assert hits_sim.sky.stars["is_variable"].any()
    ast = [a for a in hits_sim.sky.asteroids.values() if len(a)]
    assert ast, "no asteroids at all"
    stars = truth[truth["kind"] == "star"]
    assert np.allclose(stars["mag"], 31.4 - 2.5 * np.log10(stars["flux_njy"]))
    assert np.allclose(abmag_to_njy(stars["mag"]), stars["flux_njy"])


def test_trails_of_fast_asteroids():
    sim = SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=1, seed=2))
    sky = sim.sky
    plan = sim.plans[-1]
    assert len(sky.asteroids[plan.night]) > 0
    exp = sim.exposure(plan.visit, 1)
    ast = exp.truth_sources[exp.truth_sources["kind"] == "asteroid"]
    if len(ast):
        # Trail length = rate x exposure time, in pixels.
        rates = sky.asteroids[plan.night].set_index("object_id").loc[ast["object_id"], "rate"]
        expected = rates.to_numpy() * plan.exptime / 86400 * 3600 / 0.263
        assert np.allclose(ast["trail_length"].to_numpy(), expected, rtol=0.02)


def test_determinism_and_independence():
    a = SurveySimulator(SimulationConfig(dataset="cosmos-sim", n_visits=1, seed=3))
    b = SurveySimulator(SimulationConfig(dataset="cosmos-sim", n_visits=3, n_detectors=2,
                                         n_template_visits=2, seed=3))
    c = SurveySimulator(SimulationConfig(dataset="cosmos-sim", n_visits=1, seed=4))
    visit = a.plans[-1].visit
    ea, eb, ec = a.exposure(visit, 1), b.exposure(visit, 1), c.exposure(visit, 1)
    assert np.array_equal(ea.raw.image, eb.raw.image)
    pd.testing.assert_frame_equal(ea.truth_sources, eb.truth_sources)
    assert not np.array_equal(ea.raw.image, ec.raw.image)
    # Two visits never share a noise sequence.
    other = b.exposure(b.plans[-1].visit, 1)
    noise_a = ea.raw.image - ea.expected_electrons / 3.0
    noise_o = other.raw.image - other.expected_electrons / 3.0
    assert abs(np.corrcoef(noise_a[:200, :200].ravel(), noise_o[:200, :200].ravel())[0, 1]) < 0.2
