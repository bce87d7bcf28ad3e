"""DIASource measurement: the Rubin APDB DiaSource table from a difference image's detections.

Each candidate of :func:`apqa.pipeline.detect.detect_dia_sources` gets a windowed centroid,
PSF photometry at that centroid with the difference-image PSF (aperture corrected, nJy), a
12-pixel aperture flux, forced PSF photometry on the science and on the aligned template, shape
moments against the PSF's, a dipole fit when it has two lobes, a trail fit when it is
elongated, pixel flags from the mask and a reliability score. Artifacts that a demanding user
does not want as DIASources are dropped and counted: detections centred on cosmic rays or
masked pixels, and residuals of bright constant stars.

Columns, dtypes and units are those of lsst-sdm-schemas ``apdb.yaml`` (``DiaSource``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from astropy.time import Time
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, psf_stamps
from apqa.datamodel.apdb_schema import conform, empty_table
from apqa.pipeline.detect import DiaDetections
from apqa.pipeline.dipole import fit_dipole
from apqa.pipeline.moments import stamp_moments, windowed_moments
from apqa.pipeline.photometry import aperture_flux, psf_fit_centroid, psf_flux
from apqa.pipeline.pixels import boxes
from apqa.pipeline.reliability import RELIABILITY_VERSION, reliability_score
from apqa.pipeline.sky_geometry import local_pixel_scale, position_angle
from apqa.pipeline.trail import measure_trails

SIGMA_TO_FWHM = 2.3548
_UNUSABLE = ["NO_DATA", "BAD", "SAT", "CR"]
# pixelFlags_* column -> mask planes; a "Center" variant looks at the central 3x3 pixels.
_PIXEL_FLAGS = {
    "bad": ["BAD"], "cr": ["CR"], "edge": ["EDGE"], "nodata": ["NO_DATA"],
    "interpolated": ["INTRP"], "saturated": ["SAT"], "suspect": ["SUSPECT"],
    "streak": ["STREAK"], "injected": ["INJECTED"], "injected_template": ["INJECTED_TEMPLATE"],
}
_CENTER_FLAGS = ("cr", "nodata", "interpolated", "saturated", "suspect", "streak", "injected",
                 "injected_template")


class MeasureConfig(ConfigModel):
    """Settings of DIASource measurement and artifact handling."""

    aperture_radius: float = Field(12.0, gt=0, description="apFlux radius (pixels), Rubin's")
    centroid_iterations: int = Field(3, ge=0)
    dipole_min_lobe_snr: float = 5.0
    dipole_max_flux_ratio: float = 0.65
    dipole_max_chi2_dof: float = 5.0
    trail_min_snr: float = Field(8.0, description="trail fit only above this S/N")
    trail_max_length: float = Field(
        150.0, gt=0, description="elongated sources with a longer footprint (px) are "
                                 "satellite streaks, not moving objects: flagged, not fitted")
    trail_min_elongation: float = Field(
        2.0, description="trail fit when the major/minor axis ratio exceeds the PSF's by this "
                         "(2: trails longer than ~2.5 FWHM)")
    extendedness_trace_ratio: float = Field(
        1.3, description="extended when the source's moment trace exceeds the PSF's by this")
    drop_masked_centers: bool = Field(
        True, description="no DIASource whose central pixel is a cosmic ray or unusable")
    suppress_star_residuals: bool = Field(
        True, description="drop residuals of bright constant stars (see star_residual_*)")
    star_residual_min_template_snr: float = Field(
        100.0, description="a star counts as bright above this template S/N")
    star_residual_max_fraction: float = Field(
        0.02, description="a residual below this fraction of the star's flux whose shape is not "
                          "the PSF's is a subtraction residual, not variability")
    star_residual_min_chi2_dof: float = Field(
        2.0, description="PSF-fit chi^2/dof above which a residual's shape is not the PSF's")


@dataclass
class DiaMeasurement:
    """The DiaSource table and what measurement set aside."""

    dia_sources: pd.DataFrame
    sky_sources: pd.DataFrame
    suppressed: dict[str, int] = field(default_factory=dict)


def _windowed_centroid(image: np.ndarray, x: np.ndarray, y: np.ndarray, sign: np.ndarray,
                       sigma: float, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    half = max(3, int(np.ceil(2.5 * sigma)))
    off = np.arange(-half, half + 1)
    height, width = image.shape
    x, y = x.astype(np.float64).copy(), y.astype(np.float64).copy()
    start_x, start_y = x.copy(), y.copy()
    for _ in range(iterations):
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        dx = (ix - x)[:, None, None] + off[None, None, :]
        dy = (iy - y)[:, None, None] + off[None, :, None]
        w = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * boxes(image, ix, iy, half) \
            * sign[:, None, None]
        w = np.nan_to_num(w)
        total = w.sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            # Twice the windowed first moment: for a Gaussian source as wide as the window,
            # the weighted mean moves half-way to the true centre each step.
            sx = 2 * (w * dx).sum(axis=(1, 2)) / total
            sy = 2 * (w * dy).sum(axis=(1, 2)) / total
        good = (total > 0) & np.isfinite(sx) & np.isfinite(sy)
        x = np.where(good, x + np.clip(sx, -1, 1), x)
        y = np.where(good, y + np.clip(sy, -1, 1), y)
    # A centroid that wandered off its peak (noise, blends) falls back to the peak.
    lost = (np.hypot(x - start_x, y - start_y) > 2 * sigma) | (x < -0.5) | (y < -0.5) \
        | (x > width - 0.5) | (y > height - 0.5)
    return np.where(lost, start_x, x), np.where(lost, start_y, y)


def _psf_centroid(difference: Exposure, usable: np.ndarray, x: np.ndarray, y: np.ndarray,
                  sign: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Refine windowed centroids to maximum-likelihood PSF centroids (each polarity)."""
    x, y = x.copy(), y.copy()
    for s in (1.0, -1.0):
        sel = sign == s
        if not sel.any():
            continue
        fx, fy = psf_fit_centroid(s * difference.image, difference.variance, usable,
                                  difference.psf, x[sel], y[sel])
        # Keep the refinement only when it stays on the source.
        height, width = difference.shape
        near = (np.hypot(fx - x[sel], fy - y[sel]) < 2 * sigma) & (fx >= -0.5) & (fy >= -0.5) \
            & (fx <= width - 0.5) & (fy <= height - 0.5)
        x[sel] = np.where(near, fx, x[sel])
        y[sel] = np.where(near, fy, y[sel])
    return x, y


def _box_bits(mask: np.ndarray, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray
              ) -> np.ndarray:
    """OR of the mask bits inside each box [x0, x1] x [y0, y1] (clipped to the image)."""
    height, width = mask.shape
    x0, x1 = np.clip(x0, 0, width - 1), np.clip(x1, 0, width - 1)
    y0, y1 = np.clip(y0, 0, height - 1), np.clip(y1, 0, height - 1)
    # Footprint boxes are small: slicing each is cheaper than summed-area tables per plane.
    return np.array([int(np.bitwise_or.reduce(mask[b:d + 1, a:c + 1], axis=None))
                     for a, c, b, d in zip(x0, x1, y0, y1, strict=True)], dtype=np.int64)


def _diasource_ids(visit: int, detector: int, n: int) -> np.ndarray:
    # visit * 10^8 + detector * 10^5 + index: unique per (visit, detector) for < 10^5 sources.
    return np.int64(visit) * 100_000_000 + np.int64(detector) * 100_000 + np.arange(n)


def measure_dia_sources(detections: DiaDetections, difference: Exposure, science: Exposure,
                        template: Exposure, config: MeasureConfig | None = None,
                        processed_mjd: float | None = None) -> DiaMeasurement:
    """Measure every DIASource candidate and return the APDB DiaSource table.

    Parameters
    ----------
    detections
        Output of :func:`apqa.pipeline.detect.detect_dia_sources` on ``difference``.
    difference
        The difference exposure (science flux units, difference-image PSF, visit info).
    science, template
        The science exposure and the template on the science pixel grid, both calibrated
        (their own PSFs and photometric calibrations), for scienceFlux and templateFlux.
    processed_mjd
        timeProcessedMjdTai; defaults to now.

    Returns
    -------
    DiaMeasurement
        ``dia_sources`` (all apdb.yaml DiaSource columns, typed), ``sky_sources`` (x, y,
        psfFlux, psfFluxErr in nJy at blank positions) and counts of suppressed artifacts.
    """
    config = config or MeasureConfig()
    info = difference.visit_info
    visit = info.visit if info else 0
    detector = info.detector if info else 0
    cands = detections.sources
    mask = difference.mask
    usable = ~mask.is_set(_UNUSABLE) & np.isfinite(difference.variance)
    cx, cy = (difference.width - 1) / 2, (difference.height - 1) / 2
    fwhm = difference.psf.fwhm_at(cx, cy)
    sigma = fwhm / SIGMA_TO_FWHM
    apcorr = float(science.metadata.get("APCORR", 1.0))
    calib = difference.photo_calib
    suppressed = {"masked_center": 0, "bright_star_residual": 0}

    sign = np.where(cands["is_negative"].to_numpy(), -1.0, 1.0)
    x, y = _windowed_centroid(difference.image, cands["x"].to_numpy(), cands["y"].to_numpy(),
                              sign, sigma, config.centroid_iterations)
    x, y = _psf_centroid(difference, usable, x, y, sign, sigma)
    n = len(x)
    flux, flux_err, chi2, ndata = psf_flux(difference.image, difference.variance, usable,
                                           difference.psf, x, y)
    flux, flux_err = flux * apcorr, flux_err * apcorr
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    ix = np.clip(ix, 0, difference.width - 1)
    iy = np.clip(iy, 0, difference.height - 1)

    table = empty_table("DiaSource", n)
    snr = np.abs(flux) / flux_err
    table["x"], table["y"] = x, y
    # Cramer-Rao bound of a PSF-fit centroid for a Gaussian PSF: sqrt(2) sigma / SNR.
    pos_err = np.sqrt(2.0) * sigma / np.maximum(snr, 1e-3)
    table["xErr"], table["yErr"] = pos_err, pos_err
    ra, dec = difference.pixel_to_sky(x, y)
    scale = local_pixel_scale(difference, x, y)
    table["ra"], table["dec"] = ra, dec
    table["raErr"] = pos_err * scale / 3600.0
    table["decErr"] = pos_err * scale / 3600.0
    table["psfFlux"] = calib.to_njy(flux)
    table["psfFluxErr"] = calib.to_njy(flux_err)
    table["psfChi2"] = chi2
    table["psfNdata"] = ndata
    table["psfLnL"] = -0.5 * chi2
    table["psfFlux_flag"] = ~np.isfinite(flux)
    table["psfFlux_flag_noGoodPixels"] = ndata == 0
    table["snr"] = np.nan_to_num(np.abs(cands["peak_snr"].to_numpy()))
    table["isNegative"] = flux < 0
    ap, ap_err, ap_flag = aperture_flux(difference.image, difference.variance, ~usable, x, y,
                                        config.aperture_radius)
    r = config.aperture_radius
    truncated = (x < r) | (y < r) | (x > difference.width - 1 - r) | (y > difference.height - 1 - r)
    table["apFlux"], table["apFluxErr"] = calib.to_njy(ap), calib.to_njy(ap_err)
    table["apFlux_flag"] = (ap_flag != 0) | ~np.isfinite(ap)
    table["apFlux_flag_apertureTruncated"] = truncated
    table["centroid_flag"] = np.hypot(x - cands["x"], y - cands["y"]) > 2 * sigma

    _forced(table, science, x, y, "scienceFlux")
    _forced(table, template, x, y, "templateFlux")
    table["forced_PsfFlux_flag"] = ~np.isfinite(table["scienceFlux"]) | ~np.isfinite(
        table["templateFlux"])

    _shapes(table, difference, x, y, sign, sigma, scale, config)
    _pixel_flags(table, mask, ix, iy, detections, x, y)
    _dipoles(table, difference, usable, cands, config, scale)
    measure_trails(table, difference, usable, scale, snr, config.trail_min_elongation,
                   config.trail_min_snr, config.trail_max_length)

    info_band = info.band if info else ""
    table["diaSourceId"] = _diasource_ids(visit, detector, n)
    table["visit"], table["detector"], table["band"] = visit, detector, info_band
    table["midpointMjdTai"] = info.mjd if info else np.nan
    table["exposureTime"] = info.exposure_time if info else np.nan
    table["timeProcessedMjdTai"] = processed_mjd if processed_mjd is not None \
        else Time.now().tai.mjd
    table["reliability"] = reliability_score(table)
    table["reliabilityVersion"] = RELIABILITY_VERSION

    keep = np.ones(n, bool)
    if config.drop_masked_centers:
        masked_center = ~usable[iy, ix]
        suppressed["masked_center"] = int(masked_center.sum())
        keep &= ~masked_center
    if config.suppress_star_residuals:
        residual = _star_residuals(table, config) & keep
        suppressed["bright_star_residual"] = int(residual.sum())
        keep &= ~residual
    table = table[keep].reset_index(drop=True)
    table["diaSourceId"] = _diasource_ids(visit, detector, len(table))
    sky = _sky_sources(detections, difference, usable, apcorr)
    return DiaMeasurement(conform(table, "DiaSource", source="DIASource measurement"), sky,
                          suppressed)


def _forced(table: pd.DataFrame, exposure: Exposure, x: np.ndarray, y: np.ndarray,
            column: str) -> None:
    """Forced PSF photometry (nJy) at (x, y) on an exposure with its own PSF and calibration."""
    usable = ~exposure.mask.is_set(_UNUSABLE) & np.isfinite(exposure.variance)
    flux, err, _, _ = psf_flux(exposure.image, exposure.variance, usable, exposure.psf, x, y)
    apcorr = float(exposure.metadata.get("APCORR", 1.0))
    table[column] = exposure.photo_calib.to_njy(flux * apcorr)
    table[column + "Err"] = exposure.photo_calib.to_njy(err * apcorr)


def _shapes(table: pd.DataFrame, difference: Exposure, x: np.ndarray, y: np.ndarray,
            sign: np.ndarray, sigma: float, scale: np.ndarray, config: MeasureConfig) -> None:
    """Windowed moments of the source and of the PSF at its position (arcsec^2)."""
    if len(x) == 0:
        return
    ixx, iyy, ixy = windowed_moments(difference.image * 1.0, x, y, sigma)
    # Negative sources: the moments of -D (the window weights must be positive).
    neg = sign < 0
    if neg.any():
        nxx, nyy, nxy = windowed_moments(-difference.image, x[neg], y[neg], sigma)
        ixx[neg], iyy[neg], ixy[neg] = nxx, nyy, nxy
    stamps, px, py = psf_stamps(difference.psf, x, y)
    pxx, pyy, pxy = stamp_moments(stamps, x - px, y - py, sigma)
    s2 = scale**2
    table["ixx"], table["iyy"], table["ixy"] = ixx * s2, iyy * s2, ixy * s2
    table["ixxPSF"], table["iyyPSF"], table["ixyPSF"] = pxx * s2, pyy * s2, pxy * s2
    bad = ~np.isfinite(ixx)
    table["shape_flag"] = bad
    table["shape_flag_no_pixels"] = bad
    trace_ratio = (ixx + iyy) / (pxx + pyy)
    table["extendedness"] = np.where(np.isfinite(trace_ratio),
                                     (trace_ratio > config.extendedness_trace_ratio), np.nan)


def _pixel_flags(table: pd.DataFrame, mask, ix: np.ndarray, iy: np.ndarray,
                 detections: DiaDetections, x: np.ndarray, y: np.ndarray) -> None:
    """pixelFlags_* over each footprint's box, and the *Center variants over the central 3x3."""
    src = detections.sources
    half_box = np.maximum(src["xmax"] - src["xmin"], src["ymax"] - src["ymin"]).to_numpy() // 2
    bx = ((src["xmin"] + src["xmax"]) // 2).to_numpy()
    by = ((src["ymin"] + src["ymax"]) // 2).to_numpy()
    table["bboxSize"] = (2 * half_box + 1).astype(np.int32)
    box = _box_bits(mask.array, bx - half_box, bx + half_box, by - half_box, by + half_box)
    centre = _box_bits(mask.array, ix - 1, ix + 1, iy - 1, iy + 1)
    any_flag = np.zeros(len(ix), bool)
    for name, planes in _PIXEL_FLAGS.items():
        bits = mask.bitmask(planes)
        table[f"pixelFlags_{name}"] = (box & bits) != 0
        any_flag |= (box & bits) != 0
        if name in _CENTER_FLAGS:
            table[f"pixelFlags_{name}Center"] = (centre & bits) != 0
    height, width = mask.shape
    off_image = (x < -0.5) | (y < -0.5) | (x > width - 0.5) | (y > height - 0.5)
    near_edge = (bx - half_box < 0) | (by - half_box < 0) | (bx + half_box >= width) | \
        (by + half_box >= height)
    table["pixelFlags_offimage"] = off_image
    table["pixelFlags_edge"] = table["pixelFlags_edge"].to_numpy(bool) | near_edge
    table["psfFlux_flag_edge"] = near_edge
    table["pixelFlags"] = any_flag | near_edge


def _dipoles(table: pd.DataFrame, difference: Exposure, usable: np.ndarray,
             cands: pd.DataFrame, config: MeasureConfig, scale: np.ndarray) -> None:
    n = len(table)
    cols = {c: np.full(n, np.nan) for c in (
        "dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr",
        "dipoleLength", "dipoleAngle", "dipoleChi2")}
    cols["dipoleNdata"] = np.zeros(n, np.int64)
    attempted, dipole = np.zeros(n, bool), np.zeros(n, bool)
    x = table["x"].to_numpy(np.float64).copy()
    y = table["y"].to_numpy(np.float64).copy()
    # Lobes more than 3 FWHM apart are two sources in one footprint, not a dipole.
    lobe_sep = np.hypot(cands["pos_x"] - cands["neg_x"], cands["pos_y"] - cands["neg_y"])
    fwhm = difference.psf.fwhm_at((difference.width - 1) / 2, (difference.height - 1) / 2)
    two = np.flatnonzero(cands["has_positive"].to_numpy() & cands["has_negative"].to_numpy()
                         & (lobe_sep.to_numpy() <= 3 * fwhm))
    calib = difference.photo_calib
    for i in two:
        row = cands.iloc[i]
        fit = fit_dipole(difference.image, difference.variance, usable, difference.psf,
                         (row["pos_x"], row["pos_y"]), (row["neg_x"], row["neg_y"]))
        attempted[i] = True
        if fit is None:
            continue
        cols["dipoleMeanFlux"][i] = calib.to_njy(fit.mean_flux)
        cols["dipoleMeanFluxErr"][i] = calib.to_njy(0.5 * np.hypot(fit.pos_flux_err,
                                                                    fit.neg_flux_err))
        cols["dipoleFluxDiff"][i] = calib.to_njy(fit.flux_diff)
        cols["dipoleFluxDiffErr"][i] = calib.to_njy(np.hypot(fit.pos_flux_err, fit.neg_flux_err))
        cols["dipoleLength"][i] = fit.length * scale[i]
        cols["dipoleAngle"][i] = position_angle(
            difference, np.array([fit.neg_x]), np.array([fit.neg_y]), np.array([fit.pos_x]),
            np.array([fit.pos_y]))[0]
        cols["dipoleChi2"][i] = fit.chi2
        cols["dipoleNdata"][i] = fit.ndata
        dipole[i] = fit.is_dipole(config.dipole_min_lobe_snr, config.dipole_max_flux_ratio,
                                  config.dipole_max_chi2_dof)
        if dipole[i]:
            # Rubin places a dipole's DIASource at the midpoint of its lobes.
            x[i], y[i] = 0.5 * (fit.pos_x + fit.neg_x), 0.5 * (fit.pos_y + fit.neg_y)
    for name, values in cols.items():
        table[name] = values
    table["dipoleFitAttempted"], table["isDipole"] = attempted, dipole
    if dipole.any():
        ra, dec = difference.pixel_to_sky(x, y)
        table["x"], table["y"], table["ra"], table["dec"] = x, y, ra, dec


def _star_residuals(table: pd.DataFrame, config: MeasureConfig) -> np.ndarray:
    """Residuals of bright constant stars: on a bright template star, small against its flux,
    and not PSF-shaped (a real change of a star is PSF-shaped; a kernel mismatch is not)."""
    tflux = table["templateFlux"].to_numpy(np.float64)
    terr = table["templateFluxErr"].to_numpy(np.float64)
    flux = np.abs(table["psfFlux"].to_numpy(np.float64))
    chi2 = table["psfChi2"].to_numpy(np.float64)
    ndata = np.maximum(table["psfNdata"].to_numpy(np.float64) - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        bright = tflux / terr > config.star_residual_min_template_snr
        small = flux < config.star_residual_max_fraction * tflux
        misshapen = chi2 / ndata > config.star_residual_min_chi2_dof
    dipole = table["isDipole"].to_numpy(bool)
    return bright & small & (misshapen | dipole)


def _sky_sources(detections: DiaDetections, difference: Exposure, usable: np.ndarray,
                 apcorr: float) -> pd.DataFrame:
    sky = detections.sky
    if len(sky) == 0:
        return pd.DataFrame({"x": [], "y": [], "psfFlux": [], "psfFluxErr": []})
    flux, err, _, _ = psf_flux(difference.image, difference.variance, usable, difference.psf,
                               sky["x"].to_numpy(), sky["y"].to_numpy())
    calib = difference.photo_calib
    return pd.DataFrame({"x": sky["x"], "y": sky["y"], "psfFlux": calib.to_njy(flux * apcorr),
                         "psfFluxErr": calib.to_njy(err * apcorr)})
