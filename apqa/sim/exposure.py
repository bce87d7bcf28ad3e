"""Simulating one visit-detector: the raw exposure and its truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import DetectorInfo, Exposure, MoffatPsf, PhotoCalib, VisitInfo
from apqa.datamodel.photocalib import abmag_to_njy
from apqa.sim import render
from apqa.sim.astrometry import apparent_positions
from apqa.sim.camera import detector_wcs
from apqa.sim.catalogs import (
    MJD_J2016,
    asteroid_positions,
    transient_flux_ratio,
    variable_mag_offset,
)
from apqa.sim.datasets import DatasetSpec
from apqa.sim.field import SkyField, VisitPlan
from apqa.sim.instrument import DetectorCalibration

ADC_MAX = 65535.0
CM2_PER_UM2 = 1e-8


@dataclass
class SimulatedExposure:
    """A raw exposure with everything true about it.

    ``expected_electrons`` is the noiseless image in electrons including the flat-field response
    (no bias, no cosmic rays); ``photo_calib`` is the true calibration of the bias-subtracted,
    flat-fielded image in ADU.
    """

    raw: Exposure
    truth_sources: pd.DataFrame
    truth_visit: dict
    cosmic_rays: pd.DataFrame
    expected_electrons: np.ndarray
    saturated: np.ndarray
    true_wcs: WCS
    psf: MoffatPsf
    photo_calib: PhotoCalib


def zero_point_electrons(spec: DatasetSpec, plan: VisitPlan) -> float:
    """AB magnitude that gives one electron in the whole exposure."""
    return (spec.zp_e_per_s + 2.5 * np.log10(plan.exptime)
            - spec.extinction * (plan.airmass - 1.0) - plan.cloud_extinction)


def visit_psf(spec: DatasetSpec, plan: VisitPlan, rng: np.random.Generator) -> MoffatPsf:
    """The truth PSF of a visit-detector: seeing-driven size, smooth variation over the CCD."""
    cam = spec.camera
    f0 = plan.seeing / cam.pixel_scale
    var = spec.psf_fwhm_variation
    fwhm = [f0, f0 * rng.uniform(-var, var) / 2, f0 * rng.uniform(-var, var) / 2,
            f0 * var / 2, 0.0, f0 * var / 2]
    g = spec.psf_shear
    g1 = [rng.normal(0, g), rng.normal(0, g / 2), rng.normal(0, g / 2), 0, 0, 0]
    g2 = [rng.normal(0, g), rng.normal(0, g / 2), rng.normal(0, g / 2), 0, 0, 0]
    return MoffatPsf(width=cam.width, height=cam.height, fwhm_coeffs=fwhm, g1_coeffs=g1,
                     g2_coeffs=g2, beta=spec.psf_beta, trunc=spec.psf_trunc)


def _on_detector(wcs: WCS, ra: np.ndarray, dec: np.ndarray, width: int, height: int,
                 margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions and a selection of the sources within ``margin`` pixels of the image."""
    if len(ra) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, bool)
    # A cheap RA/Dec pre-cut before the iterative SIP inversion.
    corners_ra, corners_dec = wcs.all_pix2world([0, width, 0, width], [0, 0, height, height], 0)
    pad = (margin + 10) * abs(wcs.wcs.cd[1, 1]) if wcs.wcs.has_cd() else 0.01
    cosd = np.cos(np.deg2rad(np.mean(corners_dec)))
    near = ((ra > corners_ra.min() - pad / cosd) & (ra < corners_ra.max() + pad / cosd)
            & (dec > corners_dec.min() - pad) & (dec < corners_dec.max() + pad))
    x = np.full(len(ra), np.nan)
    y = np.full(len(ra), np.nan)
    if near.any():
        x[near], y[near] = wcs.all_world2pix(ra[near], dec[near], 0, tolerance=1e-10,
                                             maxiter=50, quiet=True)
    keep = (near & (x > -margin) & (x < width - 1 + margin)
            & (y > -margin) & (y < height - 1 + margin))
    return x, y, keep


def _truth_rows(kind: str, ids: np.ndarray, ra: np.ndarray, dec: np.ndarray, x: np.ndarray,
                y: np.ndarray, flux_njy: np.ndarray, **extra: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame({"object_id": ids, "kind": kind, "ra": ra, "dec": dec, "x": x, "y": y,
                       "flux_njy": flux_njy})
    for key, value in extra.items():
        df[key] = value
    return df


def simulate_exposure(spec: DatasetSpec, plan: VisitPlan, detector: int, sky: SkyField,
                      calib: DetectorCalibration, rng: np.random.Generator) -> SimulatedExposure:
    """Simulate one raw visit-detector exposure and its truth tables.

    Parameters
    ----------
    spec
        The dataset.
    plan
        The visit.
    detector
        1-based detector number.
    sky
        The dataset's sky.
    calib
        The detector's true bias, response and defects.
    rng
        Random generator for this visit-detector only (noise, PSF variation, cosmic rays).
    """
    cam = spec.camera
    shape = (cam.height, cam.width)
    true_wcs = detector_wcs(cam, detector, plan.boresight_ra, plan.boresight_dec, plan.rotation)
    psf = visit_psf(spec, plan, rng)
    zp_e = zero_point_electrons(spec, plan)
    zp_adu = zp_e - 2.5 * np.log10(cam.gain)  # one ADU is `gain` electrons: a brighter source
    photo_calib = PhotoCalib.from_zero_point(zp_adu)
    e_per_njy = cam.gain / photo_calib.calibration_mean
    margin = psf.stamp_size() / 2

    # Stars (constant and variable) at the epoch: proper motion and parallax applied.
    stars = sky.stars
    s_ra, s_dec = apparent_positions(
        stars["ra"].to_numpy(), stars["dec"].to_numpy(), stars["pmra"].to_numpy(),
        stars["pmdec"].to_numpy(), stars["parallax"].to_numpy(), MJD_J2016, plan.mjd)
    sx, sy, keep = _on_detector(true_wcs, s_ra, s_dec, cam.width, cam.height, margin)
    star_mag = stars["mag"].to_numpy() + variable_mag_offset(stars, plan.mjd)
    star_flux = abmag_to_njy(star_mag)
    truth = [_truth_rows("star", stars["object_id"].to_numpy()[keep], s_ra[keep], s_dec[keep],
                         sx[keep], sy[keep], star_flux[keep],
                         is_variable=stars["is_variable"].to_numpy()[keep])]

    tr = sky.transients
    t_flux = abmag_to_njy(tr["peak_mag"].to_numpy()) * transient_flux_ratio(tr, plan.mjd)
    tx, ty, t_keep = _on_detector(true_wcs, tr["ra"].to_numpy(), tr["dec"].to_numpy(),
                                  cam.width, cam.height, margin)
    t_keep &= t_flux > 0
    truth.append(_truth_rows("transient", tr["object_id"].to_numpy()[t_keep],
                             tr["ra"].to_numpy()[t_keep], tr["dec"].to_numpy()[t_keep],
                             tx[t_keep], ty[t_keep], t_flux[t_keep],
                             host_id=tr["host_id"].to_numpy()[t_keep]))

    objects_e = np.zeros(shape, np.float32)
    point = pd.concat(truth, ignore_index=True)
    render.add_point_sources(objects_e, point["x"], point["y"],
                             point["flux_njy"] * e_per_njy, psf)

    # Asteroids: trailed over the exposure between their start and end positions.
    ast = sky.asteroids.get(plan.night)
    if ast is not None and len(ast):
        a_ra, a_dec = asteroid_positions(ast, plan.mjd)
        ax, ay, a_keep = _on_detector(true_wcs, a_ra, a_dec, cam.width, cam.height,
                                      margin + 100)
        if a_keep.any():
            half = plan.exptime / 2 / 86400.0
            sub = ast[a_keep]
            r0, d0 = asteroid_positions(sub, plan.mjd - half)
            r1, d1 = asteroid_positions(sub, plan.mjd + half)
            x0, y0 = true_wcs.all_world2pix(r0, d0, 0)
            x1, y1 = true_wcs.all_world2pix(r1, d1, 0)
            length = np.hypot(x1 - x0, y1 - y0)
            angle = np.rad2deg(np.arctan2(y1 - y0, x1 - x0))
            a_flux = abmag_to_njy(sub["mag"].to_numpy())
            px, py, pf = render.trail_points(ax[a_keep], ay[a_keep], length, angle,
                                             a_flux * e_per_njy)
            render.add_point_sources(objects_e, px, py, pf, psf)
            truth.append(_truth_rows("asteroid", sub["object_id"].to_numpy(), a_ra[a_keep],
                                     a_dec[a_keep], ax[a_keep], ay[a_keep], a_flux,
                                     trail_length=length, trail_angle=angle))

    # Galaxies: drawn intrinsic with GalSim, then convolved with the local PSF tile by tile.
    gal = sky.galaxies
    gx, gy, g_keep = _on_detector(true_wcs, gal["ra"].to_numpy(), gal["dec"].to_numpy(),
                                  cam.width, cam.height, margin + 20)
    gsub = gal[g_keep].assign(x=gx[g_keep], y=gy[g_keep])
    gsub["flux"] = abmag_to_njy(gsub["mag"].to_numpy()) * e_per_njy
    jac = render.local_jacobians(true_wcs, gsub["x"].to_numpy(), gsub["y"].to_numpy()) \
        if len(gsub) else np.zeros((0, 2, 2))
    objects_e += render.convolve_tiles(render.galaxy_layer(shape, gsub, jac), psf)
    truth.append(_truth_rows("galaxy", gsub["object_id"].to_numpy(), gsub["ra"].to_numpy(),
                             gsub["dec"].to_numpy(), gsub["x"].to_numpy(), gsub["y"].to_numpy(),
                             abmag_to_njy(gsub["mag"].to_numpy())))

    # Sky, streak, flat-field response.
    sky_e = float(10 ** (-0.4 * (plan.sky_mag - zp_e)) * cam.pixel_scale**2)
    streak = {}
    if rng.random() < spec.streak_probability:
        streak = {"streak_x": float(rng.uniform(0, cam.width)),
                  "streak_y": float(rng.uniform(0, cam.height)),
                  "streak_angle": float(rng.uniform(0, 180)),
                  "streak_mag_per_arcsec": float(rng.uniform(18.5, 21.0))}
        e_per_px = 10 ** (-0.4 * (streak["streak_mag_per_arcsec"] - zp_e)) * cam.pixel_scale
        _, streak_e = render.streak_image(shape, streak["streak_x"], streak["streak_y"],
                                          streak["streak_angle"], psf.fwhm / 2.3548, e_per_px)
        objects_e += streak_e
    expected = (objects_e + np.float32(sky_e)) * calib.response

    # Noise, cosmic rays, saturation with bleed trails, then ADU with bias.
    electrons = render.add_noise(expected, cam.read_noise, rng)
    area_cm2 = cam.width * cam.height * cam.pixel_size_um**2 * CM2_PER_UM2
    crs = render.cosmic_rays(shape, int(rng.poisson(spec.cr_rate * area_cm2 * plan.exptime)),
                             rng)
    crs.insert(0, "detector", detector)
    crs.insert(0, "visit", plan.visit)
    if len(crs):
        np.add.at(electrons, (crs["y"].to_numpy(), crs["x"].to_numpy()),
                  crs["charge_e"].to_numpy().astype(np.float32))
    saturated = render.bleed(electrons, cam.full_well)
    adu = np.clip(electrons / np.float32(cam.gain) + calib.bias, 0, ADC_MAX).astype(np.float32)
    variance = ((expected + np.float32(cam.read_noise**2)) / np.float32(cam.gain**2))

    nominal_wcs = detector_wcs(
        cam, detector, plan.boresight_ra + rng.normal(0, 1.5) / 3600 / np.cos(
            np.deg2rad(plan.boresight_dec)),
        plan.boresight_dec + rng.normal(0, 1.5) / 3600, plan.rotation + rng.normal(0, 0.005))
    nominal_calib = PhotoCalib.from_zero_point(
        spec.zp_e_per_s + 2.5 * np.log10(plan.exptime / cam.gain)
        - spec.extinction * (plan.airmass - 1), 0.1)
    visit_info = VisitInfo(
        visit=plan.visit, detector=detector, band=spec.band,
        physical_filter=spec.physical_filter, mjd=plan.mjd, exposure_time=plan.exptime,
        airmass=plan.airmass, seeing=plan.seeing, boresight_ra=plan.boresight_ra,
        boresight_dec=plan.boresight_dec, rotation_angle=plan.rotation,
    )
    metadata = fits.Header()
    metadata["DATASET"] = (spec.name, "apqa embedded dataset")
    metadata["IMAGETYP"] = ("template" if plan.is_template else "science", "raw visit role")
    metadata["OBSTYPE"] = ("raw", "not yet bias-subtracted or flat-fielded")
    raw = Exposure(
        image=adu, variance=variance, wcs=nominal_wcs, photo_calib=nominal_calib,
        visit_info=visit_info,
        detector_info=DetectorInfo(gain=cam.gain, read_noise=cam.read_noise,
                                   saturation=cam.full_well / cam.gain,
                                   name=f"{cam.name}-{detector:02d}"),
        metadata=metadata,
    )

    sources = pd.concat(truth, ignore_index=True)
    sources.insert(0, "detector", detector)
    sources.insert(0, "visit", plan.visit)
    sources["mag"] = np.where(sources["flux_njy"] > 0,
                              31.4 - 2.5 * np.log10(np.clip(sources["flux_njy"], 1e-30, None)),
                              np.nan)
    sources["counts"] = sources["flux_njy"] / photo_calib.calibration_mean
    sources["in_image"] = ((sources["x"] >= -0.5) & (sources["x"] < cam.width - 0.5)
                           & (sources["y"] >= -0.5) & (sources["y"] < cam.height - 0.5))
    ix = np.clip(np.rint(sources["x"]).astype(int), 0, cam.width - 1)
    iy = np.clip(np.rint(sources["y"]).astype(int), 0, cam.height - 1)
    sources["saturated"] = saturated[iy, ix] & sources["in_image"]

    wcs_header = true_wcs.to_header(relax=True).tostring(sep="\n")
    truth_visit = {
        "visit": plan.visit, "detector": detector, "is_template": plan.is_template,
        "night": plan.night, "mjd": plan.mjd, "exptime": plan.exptime, "airmass": plan.airmass,
        "seeing": plan.seeing, "psf_fwhm_px": psf.fwhm, "psf_beta": psf.beta,
        "psf_trunc": psf.trunc, "psf_fwhm_coeffs": list(map(float, psf.fwhm_coeffs)),
        "psf_g1_coeffs": list(map(float, psf.g1_coeffs)),
        "psf_g2_coeffs": list(map(float, psf.g2_coeffs)),
        "sky_e": sky_e, "sky_adu": sky_e / cam.gain, "zero_point": zp_adu,
        "calib_njy_per_adu": photo_calib.calibration_mean, "gain": cam.gain,
        "read_noise": cam.read_noise, "full_well": cam.full_well,
        "boresight_ra": plan.boresight_ra, "boresight_dec": plan.boresight_dec,
        "rotation": plan.rotation, "true_wcs": wcs_header,
        "n_cosmic_rays": int(crs["cr_id"].nunique()) if len(crs) else 0,
        "n_saturated_pixels": int(saturated.sum()),
        "has_streak": bool(streak), **{k: streak.get(k, np.nan) for k in (
            "streak_x", "streak_y", "streak_angle", "streak_mag_per_arcsec")},
    }
    return SimulatedExposure(raw, sources, truth_visit, crs, expected, saturated, true_wcs, psf,
                             photo_calib)
