"""Astrometric fit against the simulator's truth: offsets, rotation, proper motion, failures."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.config import config_from_mapping
from apqa.errors import ConfigError, InputError, StageError
from apqa.pipeline.astrometry import AstrometryConfig, fit_astrometry
from apqa.pipeline.refcat import position_error_at_epoch, propagate_to_epoch
from apqa.sim import SimulationConfig, SurveySimulator

MAX_RMS_MAS = 10.0


@dataclass
class Case:
    """Measured sources and references for one simulated exposure, and its truth."""

    sources: pd.DataFrame
    stars: pd.DataFrame  # truth stars in the image: true x, y, ra, dec
    true_wcs: WCS
    header_wcs: WCS
    shape: tuple[int, int]
    refcat: pd.DataFrame
    ref_ra: np.ndarray  # at the epoch
    ref_dec: np.ndarray
    ref_err: np.ndarray
    ref_mag: np.ndarray


def _sep_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Haversine separation in mas (independent of the code under test)."""
    r1, d1, r2, d2 = (np.deg2rad(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(h))) * 3.6e6


@pytest.fixture(scope="module")
def case() -> Case:
    sim = SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=1, seed=1))
    exp = sim.exposure(410001, 1)
    truth = exp.truth_sources
    shape = exp.raw.image.shape
    # Measured sources: true positions of stars and galaxies (clutter that matches nothing),
    # with centroid noise from 0.02 px (bright) to 0.05 px (faint).
    sel = truth[truth["in_image"] & truth["kind"].isin(["star", "galaxy"]) & ~truth["saturated"]]
    rng = np.random.default_rng(2024)
    sigma = np.clip(0.02 * np.sqrt(abs(1e4 / sel["flux_njy"].to_numpy())), 0.02, 0.05)
    sources = pd.DataFrame({
        "x": sel["x"].to_numpy() + rng.normal(0, sigma),
        "y": sel["y"].to_numpy() + rng.normal(0, sigma),
        "xErr": sigma, "yErr": sigma, "flux": sel["flux_njy"].to_numpy(),
    }, index=sel.index + 1000)  # labels that are not positions
    mjd = exp.raw.visit_info.mjd
    ref_ra, ref_dec = propagate_to_epoch(sim.refcat, mjd)
    return Case(
        sources=sources, stars=truth[truth["in_image"] & (truth["kind"] == "star")],
        true_wcs=WCS(fits.Header.fromstring(exp.truth_visit["true_wcs"], sep="\n")),
        header_wcs=exp.raw.wcs, shape=shape, refcat=sim.refcat, ref_ra=ref_ra,
        ref_dec=ref_dec, ref_err=position_error_at_epoch(sim.refcat, mjd),
        ref_mag=sim.refcat["g_mag"].to_numpy(),
    )


def perturbed_wcs(wcs: WCS, shape: tuple[int, int], d_ra_arcsec: float, d_dec_arcsec: float,
                  rotation_deg: float) -> WCS:
    """``wcs`` rotated on the sky by ``rotation_deg`` and moved so that the image centre is
    off by (d_ra, d_dec) arcsec."""
    out = wcs.deepcopy()
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if out.wcs.has_cd():
        out.wcs.cd = rot @ wcs.wcs.cd
    else:
        cdelt = wcs.wcs.cdelt[:, None]
        out.wcs.pc = rot @ (wcs.wcs.get_pc() * cdelt) / cdelt
    cx, cy = (shape[1] - 1) / 2, (shape[0] - 1) / 2
    ra_t, dec_t = wcs.all_pix2world(cx, cy, 0)
    target = np.array([ra_t + d_ra_arcsec / 3600 / np.cos(np.deg2rad(dec_t)),
                       dec_t + d_dec_arcsec / 3600])
    for _ in range(4):  # CRVAL is not at the centre: converge on the shift there
        out.wcs.set()
        now = np.array(out.all_pix2world(cx, cy, 0))
        out.wcs.crval = out.wcs.crval + (target - now)
    out.wcs.set()
    return out


def rms_vs_truth(wcs: WCS, case: Case) -> tuple[float, float]:
    """(rms at the truth stars, rms on a grid against the true WCS), in mas."""
    ra, dec = wcs.all_pix2world(case.stars["x"], case.stars["y"], 0)
    stars = np.sqrt(np.mean(_sep_mas(ra, dec, case.stars["ra"], case.stars["dec"]) ** 2))
    gx, gy = np.meshgrid(np.linspace(0, case.shape[1] - 1, 17),
                         np.linspace(0, case.shape[0] - 1, 33))
    fit = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    true = case.true_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    return float(stars), float(np.sqrt(np.mean(_sep_mas(*fit, *true) ** 2)))


def _fit(case: Case, wcs: WCS, ra=None, dec=None, **kwargs):
    kwargs.setdefault("ref_mag", case.ref_mag)
    kwargs.setdefault("ref_err_mas", case.ref_err)
    return fit_astrometry(case.sources, wcs, case.ref_ra if ra is None else ra,
                          case.ref_dec if dec is None else dec, case.shape, **kwargs)


@pytest.mark.parametrize("d_ra, d_dec, rotation", [(30, 30, 1.0), (-30, 30, -1.0),
                                                   (30, -30, -1.0), (-30, -30, 1.0)])
def test_recovers_truth_from_30_arcsec_and_1_degree_off(case, d_ra, d_dec, rotation):
    guess = perturbed_wcs(case.true_wcs, case.shape, d_ra, d_dec, rotation)
    start_stars, _ = rms_vs_truth(guess, case)
    assert start_stars > 30_000  # the start really is tens of arcseconds off
    t0 = time.perf_counter()
    result = _fit(case, guess)
    elapsed = time.perf_counter() - t0
    rms_stars, rms_grid = rms_vs_truth(result.wcs, case)
    assert rms_stars <= MAX_RMS_MAS
    assert rms_grid <= MAX_RMS_MAS
    assert elapsed < 1.0
    assert list(result.wcs.wcs.ctype) == ["RA---TAN-SIP", "DEC--TAN-SIP"]
    assert result.sip_order == 3 and result.wcs.sip.a_order == 3
    # The CD matrix's sky rotation undoes the perturbation (pixel parity flips its sign).
    assert result.initial_rotation_deg == pytest.approx(-rotation, abs=0.05)
    # A header WCS east of the truth puts the references west (+x) of their sources.
    scale = 0.263
    assert result.initial_offset_px[0] == pytest.approx(-d_ra / scale, abs=3)
    assert result.initial_offset_px[1] == pytest.approx(d_dec / scale, abs=3)
    # Matches: most refcat stars on the image, scatter as expected from 0.02 px + refcat errors.
    assert result.n_matches >= 40
    assert 3.0 < result.scatter_mas < 15.0
    used = result.matches[result.matches["used"]]
    assert len(used) == result.n_matches
    assert np.sqrt(np.mean(used["separation_mas"] ** 2)) == pytest.approx(result.scatter_mas)
    assert set(result.matches["source_index"]) <= set(case.sources.index)
    assert np.sqrt(np.mean(used["dx"] ** 2 + used["dy"] ** 2)) * scale * 1000 == pytest.approx(
        result.scatter_mas, rel=0.05)


def test_matches_are_true_pairs(case):
    result = _fit(case, perturbed_wcs(case.true_wcs, case.shape, 30, 30, 1.0))
    truth_index = result.matches["source_index"].to_numpy() - 1000
    assert np.isin(truth_index, case.stars.index).all()  # no galaxy matched
    ref_ids = case.refcat["source_id"].to_numpy()[result.matches["ref_index"]]
    assert (case.stars.loc[truth_index, "object_id"].to_numpy() == ref_ids).all()
    assert result.matches["ref_index"].is_unique and result.matches["source_index"].is_unique


def test_header_wcs_start(case):
    result = _fit(case, case.header_wcs)
    rms_stars, rms_grid = rms_vs_truth(result.wcs, case)
    assert rms_stars <= MAX_RMS_MAS and rms_grid <= MAX_RMS_MAS


def test_ignoring_proper_motion_fails(case):
    """The 2016.0 catalogue positions ten years later are ~50 mas off: the fit must propagate."""
    guess = perturbed_wcs(case.true_wcs, case.shape, 30, 30, 1.0)
    raw = _fit(case, guess, case.refcat["ra"].to_numpy(), case.refcat["dec"].to_numpy())
    propagated = _fit(case, guess)
    raw_rms = rms_vs_truth(raw.wcs, case)
    good_rms = rms_vs_truth(propagated.wcs, case)
    assert min(raw_rms) > 2 * MAX_RMS_MAS
    assert max(good_rms) <= MAX_RMS_MAS
    assert raw.scatter_mas > 3 * propagated.scatter_mas


def test_fitted_wcs_round_trips_and_serialises(case):
    result = _fit(case, perturbed_wcs(case.true_wcs, case.shape, -30, 30, -1.0))
    wcs = result.wcs
    x, y = case.stars["x"].to_numpy(), case.stars["y"].to_numpy()
    ra, dec = wcs.all_pix2world(x, y, 0)
    bx, by = wcs.all_world2pix(ra, dec, 0)
    assert np.hypot(bx - x, by - y).max() < 1e-4
    # Through a FITS header, as ds9 or another reader gets it.
    reread = WCS(fits.Header.fromstring(wcs.to_header(relax=True).tostring()))
    ra2, dec2 = reread.all_pix2world(x, y, 0)
    assert _sep_mas(ra, dec, ra2, dec2).max() < 0.01
    # A reader that uses AP/BP instead of iterating: core TAN pixel, then the inverse polynomial.
    hdr = wcs.to_header(relax=True)
    core_x, core_y = wcs.wcs_world2pix(ra, dec, 0)
    big_u, big_v = core_x - (hdr["CRPIX1"] - 1), core_y - (hdr["CRPIX2"] - 1)
    u, v = big_u.copy(), big_v.copy()
    for key, value in hdr.items():
        for prefix, target in (("AP_", u), ("BP_", v)):
            if key.startswith(prefix) and key != f"{prefix}ORDER":
                p, q = (int(n) for n in key[3:].split("_"))
                target += value * big_u**p * big_v**q
    assert np.hypot(u + hdr["CRPIX1"] - 1 - x, v + hdr["CRPIX2"] - 1 - y).max() < 1e-3
    assert result.inverse_max_error_px < 1e-3
    assert hdr["CRPIX1"] == (case.shape[1] + 1) / 2 and hdr["CRPIX2"] == (case.shape[0] + 1) / 2


def test_without_magnitudes_or_errors(case):
    sources = case.sources.drop(columns=["flux", "xErr", "yErr"])
    result = fit_astrometry(sources, perturbed_wcs(case.true_wcs, case.shape, 20, -25, 0.8),
                            case.ref_ra, case.ref_dec, case.shape)
    assert max(rms_vs_truth(result.wcs, case)) <= MAX_RMS_MAS


def test_nan_positions_are_ignored(case):
    sources = case.sources.copy()
    sources.iloc[::7, 0] = np.nan
    result = fit_astrometry(sources, case.header_wcs, case.ref_ra, case.ref_dec, case.shape)
    assert result.n_matches >= 30
    assert not sources.loc[result.matches["source_index"], "x"].isna().any()


def test_wrong_refcat_region(case):
    elsewhere = case.ref_dec + 5.0
    span = re.escape(f"Dec {elsewhere.min():.4f}..{elsewhere.max():.4f}")
    with pytest.raises(StageError, match=rf"wrong refcat region.*centred at RA 145\.\d+, "
                                         rf"Dec -2\.\d+ deg.*{span}"):
        _fit(case, case.header_wcs, case.ref_ra, elsewhere)


def test_too_few_sources(case):
    few = case.sources.nlargest(5, "flux")
    with pytest.raises(StageError, match=r"from 5 sources .* reference stars over the image"):
        fit_astrometry(few, case.header_wcs, case.ref_ra, case.ref_dec, case.shape)


def test_too_few_matches_reports_counts(case):
    config = AstrometryConfig(min_matches=200)
    with pytest.raises(StageError, match=r"too few matches: \d+ within .*need 200.*"
                                         rf"from {len(case.sources)} sources"):
        _fit(case, case.header_wcs, config=config)


def test_bad_inputs(case):
    with pytest.raises(InputError, match="sources: column 'y' not found"):
        fit_astrometry(case.sources.drop(columns="y"), case.header_wcs, case.ref_ra,
                       case.ref_dec, case.shape)
    with pytest.raises(InputError, match="ref_ra and ref_dec"):
        fit_astrometry(case.sources, case.header_wcs, case.ref_ra, case.ref_dec[:-1],
                       case.shape)
    with pytest.raises(InputError, match="ref_mag"):
        fit_astrometry(case.sources, case.header_wcs, case.ref_ra, case.ref_dec, case.shape,
                       ref_mag=case.ref_mag[:3])


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'sip_ordr'"):
        config_from_mapping(AstrometryConfig, {"sip_ordr": 4}, "astrometry.yaml")
    assert config_from_mapping(AstrometryConfig, {"sip_order": 4}, "x").sip_order == 4


def test_thousands_of_sources_fit_fast(case):
    """3,000 reference stars and ~5,400 sources (incl. 3,000 clutter) in well under a second."""
    rng = np.random.default_rng(7)
    height, width = case.shape
    n = 3000
    x, y = rng.uniform(-30, width + 30, n), rng.uniform(-30, height + 30, n)
    ra, dec = case.true_wcs.all_pix2world(x, y, 0)
    mag = rng.uniform(14, 21, n)
    seen = (x > 0) & (x < width - 1) & (y > 0) & (y < height - 1) & (rng.random(n) < 0.85)
    m = int(seen.sum())
    sources = pd.concat([
        pd.DataFrame({"x": x[seen] + rng.normal(0, 0.02, m), "y": y[seen] + rng.normal(0, 0.02, m),
                      "flux": 10 ** (-0.4 * (mag[seen] - 31.4))}),
        pd.DataFrame({"x": rng.uniform(0, width, n), "y": rng.uniform(0, height, n),
                      "flux": rng.uniform(0, 5e4, n)}),
    ], ignore_index=True)
    guess = perturbed_wcs(case.true_wcs, case.shape, 30, -30, 1.0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = fit_astrometry(sources, guess, ra, dec, case.shape, ref_mag=mag)
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0
    assert result.n_matches > 0.95 * m
    inside = (x > 0) & (x < width - 1) & (y > 0) & (y < height - 1)
    fit_ra, fit_dec = result.wcs.all_pix2world(x[inside], y[inside], 0)
    assert np.sqrt(np.mean(_sep_mas(fit_ra, fit_dec, ra[inside], dec[inside]) ** 2)) < 2.0
