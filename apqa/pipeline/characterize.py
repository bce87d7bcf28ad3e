"""Characterization: background, source detection and measurement, PSF model, aperture
correction, iterated as real pipelines do (detect -> mask sources -> background -> PSF -> detect
with the PSF as matched filter -> remeasure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import sep
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.errors import StageError
from apqa.log import get_logger
from apqa.pipeline.detect import detect_sources
from apqa.pipeline.isr import estimate_fwhm
from apqa.pipeline.moments import windowed_moments
from apqa.pipeline.photometry import aperture_correction, aperture_flux, psf_flux
from apqa.pipeline.pixels import any_in_box, bin_sum, grow_square, upsample
from apqa.pipeline.psf_model import (
    PsfModelConfig,
    fit_psf,
    isolated_sources,
    psf_star_candidates,
)

log = get_logger(__name__)
SIGMA_TO_FWHM = 2.3548
_FLAG_PLANES = ("SAT", "BAD", "CR", "INTRP", "NO_DATA")


class CharacterizeConfig(ConfigModel):
    """Background, detection, measurement and PSF settings."""

    background_mesh: int = Field(128, ge=16, description="mesh size in pixels")
    background_filter: int = Field(3, ge=1, description="median filter over meshes")
    detection_threshold: float = Field(5.0, gt=0, description="sigma")
    min_area: int = Field(5, ge=1, description="pixels")
    deblend_contrast: float = Field(0.005, gt=0)
    mask_grow_fwhm: float = Field(1.0, ge=0, description="source mask growth for background")
    n_iterations: int = Field(2, ge=1)
    detection_binning: Annotated[int, Field(ge=1, le=4)] | Literal["auto"] = Field(
        "auto", description="detect on pixels binned this many times per axis (1-4); centroids "
                            "and fluxes stay full-res. 'auto' bins 2x2 when the PSF FWHM is at "
                            "least 4 px: the matched-filter S/N of a well-sampled PSF barely "
                            "changes, and sep's scan and deblending cost a quarter")
    auto_binning_min_fwhm: float = Field(
        4.0, gt=0, description="'auto' binning needs this PSF FWHM (px) or more")
    early_pass_binning: int = Field(
        2, ge=1, le=4, description="binning of the detection passes before the last")
    calibration_aperture_fwhm: float = Field(
        3.5, gt=0, description="aperture radius (FWHM) that PSF fluxes are corrected to")
    psf: PsfModelConfig = Field(default_factory=PsfModelConfig)


@dataclass
class CharacterizeResult:
    """Exposure with background removed and PSF attached, its sources, and quality numbers."""

    exposure: Exposure
    sources: pd.DataFrame
    background: np.ndarray
    quality: dict[str, float] = field(default_factory=dict)


def _background(image: np.ndarray, masked: np.ndarray,
                config: CharacterizeConfig) -> sep.Background:
    return sep.Background(np.ascontiguousarray(image, np.float32), mask=masked,
                          bw=config.background_mesh, bh=config.background_mesh,
                          fw=config.background_filter, fh=config.background_filter)


def _binning(config: CharacterizeConfig, fwhm: float) -> int:
    if config.detection_binning != "auto":
        return int(config.detection_binning)
    return 2 if fwhm >= config.auto_binning_min_fwhm else 1


def _detect(image: np.ndarray, variance: np.ndarray, masked: np.ndarray, fwhm: float,
            config: CharacterizeConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Matched-filter detection, on ``detection_binning``-binned pixels when asked (positions
    and footprints mapped back to full resolution)."""
    factor = _binning(config, fwhm)
    if factor == 1:
        return detect_sources(image, variance, masked, fwhm, config.detection_threshold,
                              config.min_area, config.deblend_contrast)
    found, segmap = detect_sources(
        bin_sum(np.where(masked, np.float32(0), image), factor),
        bin_sum(np.where(masked, np.float32(0), variance), factor), bin_sum(masked, factor) > 0,
        fwhm / factor, config.detection_threshold,
        max(1, config.min_area // factor**2), config.deblend_contrast)
    # Binned pixel i covers full pixels factor*i .. factor*i + factor - 1.
    found["x"] = factor * found["x"] + (factor - 1) / 2
    found["y"] = factor * found["y"] + (factor - 1) / 2
    return found, upsample(segmap, factor, image.shape)


def detect_and_measure(image: np.ndarray, variance: np.ndarray, masked: np.ndarray,
                       flagged: np.ndarray, fwhm: float, config: CharacterizeConfig
                       ) -> tuple[pd.DataFrame, np.ndarray]:
    """Detect sources above threshold; measure centroids, shapes and aperture fluxes.

    Returns the catalog and the segmentation map (source footprints).
    """
    found, segmap = _detect(image, variance, masked, fwhm, config)
    x, y = found["x"].to_numpy(), found["y"].to_numpy()
    sigma = fwhm / SIGMA_TO_FWHM
    data = np.ascontiguousarray(image, np.float32)
    xw, yw, wflag = sep.winpos(data, x, y, sigma, mask=masked)
    good_win = (wflag == 0) & np.isfinite(xw) & (np.hypot(xw - x, yw - y) < fwhm)
    x = np.where(good_win, xw, x)
    y = np.where(good_win, yw, y)
    radius = config.calibration_aperture_fwhm * fwhm
    ap, ap_err, ap_flag = aperture_flux(image, variance, masked, x, y, radius)
    snr = ap / np.where(ap_err > 0, ap_err, np.inf)
    ixx, iyy, ixy = windowed_moments(data, x, y, sigma)
    # Any saturated, bad, cosmic-ray or interpolated pixel within 2 FWHM flags the source.
    near_flag = any_in_box(flagged, x, y, max(1, int(2 * fwhm)))
    position_err = sigma / np.clip(snr, 1e-3, None)
    catalog = pd.DataFrame({
        "x": x, "y": y, "xErr": position_err, "yErr": position_err,
        "flux": ap, "apFlux": ap, "apFluxErr": ap_err, "snr": snr,
        "ixx": ixx, "iyy": iyy, "ixy": ixy, "npix": found["npix"].to_numpy(),
        "sep_flag": found["sep_flag"].to_numpy() | ap_flag,
        "bad_pixels": near_flag | ~np.isfinite(ixx),
        "blended": found["blended"].to_numpy(),
    })
    return catalog, segmap


def characterize(exposure: Exposure, config: CharacterizeConfig | None = None
                 ) -> CharacterizeResult:
    """Fit background and PSF and measure sources on a post-ISR exposure.

    Returns a background-subtracted exposure with a
    :class:`~apqa.datamodel.PolynomialPsf` attached, and a source catalog with PSF and aperture
    fluxes in counts (``psfFlux`` aperture-corrected), shapes and flags.
    """
    config = config or CharacterizeConfig()
    mask = exposure.mask
    masked = mask.is_set(["NO_DATA", "BAD", "SAT"])
    flagged = mask.is_set(list(_FLAG_PLANES))
    image = np.asarray(exposure.image, np.float32)  # read only here: no copy
    variance = exposure.variance
    values = image[~masked]
    if not np.isfinite(values).any() or np.ptp(values) == 0:
        raise StageError("image is flat or empty: no background or sources to measure")
    del values
    # ISR already estimated the FWHM (FWHMEST); measuring it again costs a detection pass.
    fwhm = float(exposure.metadata.get("FWHMEST", np.nan))
    if not np.isfinite(fwhm):
        fwhm = estimate_fwhm(image, masked | flagged)
    if not np.isfinite(fwhm):
        seeing = exposure.visit_info.seeing if exposure.visit_info else float("nan")
        fwhm = 3.0 if not np.isfinite(seeing) else seeing / 0.2
    source_mask = np.zeros(image.shape, bool)
    fit = None
    sub = None
    for iteration in range(config.n_iterations):
        bkg = _background(image, masked | source_mask, config)
        sub = None  # the previous pass's image goes before the next one is made
        sub = bkg.back()  # the background map, made the background-subtracted image in place
        np.subtract(image, sub, out=sub)
        # Early passes only feed PSF-star selection (S/N > 30) and the background's source
        # mask: a higher threshold there saves the deblending of faint sources in crowded
        # fields, and binned pixels find those bright sources at a quarter of the cost; the
        # last pass detects down to the configured threshold.
        last = iteration == config.n_iterations - 1
        pass_config = config if last else config.model_copy(
            update={"detection_threshold": max(config.detection_threshold, 10.0),
                    "deblend_contrast": 1.0,  # 1.0 switches deblending off
                    "detection_binning": max(_binning(config, fwhm),
                                             config.early_pass_binning)})
        sources, segmap = detect_and_measure(sub, variance, masked, flagged, fwhm, pass_config)
        grow = max(1, round(config.mask_grow_fwhm * fwhm))
        source_mask = grow_square(segmap > 0, grow)
        # Source i's footprint is label i + 1 in the segmentation map.
        candidates = psf_star_candidates(sources, fwhm, config.psf)
        fit = fit_psf(sub, variance, sources["x"].to_numpy()[candidates],
                      sources["y"].to_numpy()[candidates], fwhm, image.shape, config.psf,
                      labels=segmap, label_ids=candidates + 1)
        fwhm = fit.psf.fwhm
        log.debug("characterize iteration %d: %d sources, %d PSF stars, FWHM %.3f px",
                  iteration, len(sources), int(fit.used.sum()), fwhm)
    assert fit is not None

    usable = ~mask.is_set(["NO_DATA", "BAD", "SAT", "CR"])
    flux, flux_err, chi2, ndata = psf_flux(sub, variance, usable, fit.psf, sources["x"],
                                           sources["y"])
    used = candidates[fit.used]  # row positions
    ap_corr, ap_corr_err = aperture_correction(flux[used],
                                               sources["apFlux"].to_numpy()[used],
                                               sources["apFluxErr"].to_numpy()[used])
    sources["psfFlux"] = flux * ap_corr
    sources["psfFluxErr"] = flux_err * ap_corr
    sources["psfChi2"] = chi2
    sources["psfNdata"] = ndata
    rows = np.arange(len(sources))
    sources["calib_psf_used"] = np.isin(rows, used)
    sources["calib_psf_candidate"] = np.isin(rows, candidates)
    sources["isolated"] = isolated_sources(sources, config.psf.isolation_fwhm * fwhm)
    # Extended sources lose light in a PSF fit compared with the large aperture.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sources["psfFlux"] / sources["apFlux"]
    sources["extendedness"] = np.where(np.isfinite(ratio),
                                       (ratio < 0.93) & (sources["snr"] > 10), np.nan)
    out = Exposure(image=sub, variance=variance, mask=mask.copy(), psf=fit.psf,
                   wcs=exposure.wcs, photo_calib=exposure.photo_calib,
                   visit_info=exposure.visit_info, detector_info=exposure.detector_info,
                   metadata=exposure.metadata.copy())
    out.mask.set("DETECTED", source_mask & (segmap > 0))
    # Carried with the image: PSF fluxes measured later (e.g. on difference images made with
    # this PSF) need the same correction to total flux.
    out.metadata["APCORR"] = (float(ap_corr), "aperture correction of PSF fluxes")
    quality = {
        "psf_fwhm_px": fwhm,
        "psf_residual_chi2": fit.residual_chi2,
        "n_psf_stars": float(fit.used.sum()),
        "n_psf_candidates": float(fit.n_candidates),
        "background_rms": float(bkg.globalrms),
        "background_level": float(bkg.globalback),
        "n_sources": float(len(sources)),
        "aperture_correction": ap_corr,
        "aperture_correction_err": ap_corr_err,
    }
    return CharacterizeResult(out, sources, bkg.back(), quality)  # the last pass's background
