"""Calibration: astrometric TAN-SIP fit against a reference catalog (proper motions and parallax
applied at the epoch) and a colour-free photometric zero point."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, PhotoCalib
from apqa.datamodel.photocalib import AB_MAG_OF_ONE_NJY
from apqa.errors import StageError
from apqa.log import get_logger
from apqa.pipeline.astrometry import AstrometryConfig, fit_astrometry
from apqa.pipeline.refcat import position_error_at_epoch, propagate_to_epoch, reference_flux

log = get_logger(__name__)


class CalibrateConfig(ConfigModel):
    """Astrometric and photometric calibration settings."""

    astrometry: AstrometryConfig = Field(default_factory=AstrometryConfig)
    astrometry_min_snr: float = Field(10.0, gt=0)
    photometry_min_snr: float = Field(30.0, gt=0)
    photometry_clip_sigma: float = Field(3.0, gt=0)
    min_photometry_stars: int = Field(5, ge=1)


@dataclass
class CalibrateResult:
    """The exposure with fitted WCS and photometric calibration, calibrated sources, quality."""

    exposure: Exposure
    sources: pd.DataFrame
    quality: dict[str, float] = field(default_factory=dict)


def _zero_point(ref_mag: np.ndarray, ref_mag_err: np.ndarray, counts: np.ndarray,
                counts_err: np.ndarray, clip: float) -> tuple[float, float, np.ndarray]:
    """Weighted, sigma-clipped mean of ref_mag + 2.5 log10(counts); returns (zp, err, used)."""
    zp_i = ref_mag + 2.5 * np.log10(counts)
    err_i = np.hypot(ref_mag_err, 2.5 / np.log(10) * counts_err / counts)
    used = np.isfinite(zp_i) & np.isfinite(err_i)
    for _ in range(10):
        w = 1.0 / np.maximum(err_i[used], 1e-4) ** 2
        zp = float(np.sum(w * zp_i[used]) / np.sum(w))
        scatter = 1.4826 * float(np.median(np.abs(zp_i[used] - zp)))
        limit = clip * np.maximum(np.hypot(scatter, err_i), 1e-4)
        new = np.isfinite(zp_i) & (np.abs(zp_i - zp) < limit)
        if np.array_equal(new, used):
            break
        used = new
    w = 1.0 / np.maximum(err_i[used], 1e-4) ** 2
    zp = float(np.sum(w * zp_i[used]) / np.sum(w))
    # The error of the mean, inflated when the scatter exceeds the stated errors.
    chi2 = float(np.sum(w * (zp_i[used] - zp) ** 2) / max(used.sum() - 1, 1))
    err = float(np.sqrt(1.0 / np.sum(w) * max(chi2, 1.0)))
    return zp, err, used


def calibrate(exposure: Exposure, sources: pd.DataFrame, refcat: pd.DataFrame | None,
              config: CalibrateConfig | None = None) -> CalibrateResult:
    """Fit the WCS and zero point of a characterized exposure and calibrate its sources.

    Without a reference catalog the header WCS and photometric calibration (MAGZERO) are kept.
    Adds ``ra``, ``dec`` (degrees) to the sources and converts ``psfFlux``/``apFlux`` and their
    errors from counts to nJy.

    Raises
    ------
    StageError
        No astrometric match, or too few stars for a zero point.
    """
    config = config or CalibrateConfig()
    sources = sources.copy()
    wcs = exposure.wcs
    photo_calib = exposure.photo_calib
    quality: dict[str, float] = {"astrometric_scatter_mas": float("nan"),
                                 "n_astrometry_matches": 0.0, "zero_point": float("nan"),
                                 "zero_point_err_mmag": float("nan"),
                                 "n_photometry_stars": 0.0}
    sources["calib_astrometry_used"] = False
    sources["calib_photometry_used"] = False
    if refcat is not None:
        if wcs is None:
            raise StageError("astrometric calibration needs a starting WCS in the header")
        visit = exposure.visit_info
        mjd = visit.mjd if visit is not None and np.isfinite(visit.mjd) else None
        if mjd is None:
            raise StageError("astrometric calibration needs the exposure's epoch (MJD-OBS)")
        ref_ra, ref_dec = propagate_to_epoch(refcat, mjd)
        band = visit.band
        ref_flux, ref_flux_err = reference_flux(refcat, band)
        ref_mag = AB_MAG_OF_ONE_NJY - 2.5 * np.log10(np.clip(ref_flux, 1e-30, None))
        good = ((sources["snr"] > config.astrometry_min_snr) & ~sources["bad_pixels"]
                & (sources["psfFlux"] > 0))
        fit = fit_astrometry(
            sources.loc[good, ["x", "y", "xErr", "yErr"]].assign(
                flux=sources.loc[good, "psfFlux"]),
            wcs, ref_ra, ref_dec, exposure.shape, config.astrometry, ref_mag=ref_mag,
            ref_err_mas=position_error_at_epoch(refcat, mjd))
        wcs = fit.wcs
        used = fit.matches[fit.matches["used"]]
        sources.loc[used["source_index"].to_numpy(), "calib_astrometry_used"] = True
        quality["astrometric_scatter_mas"] = fit.scatter_mas
        quality["n_astrometry_matches"] = float(fit.n_matches)

        # Photometry: the matched, unflagged, bright, non-variable stars.
        matches = fit.matches
        src = sources.loc[matches["source_index"].to_numpy()]
        ref_idx = matches["ref_index"].to_numpy()
        variable = (refcat["phot_variable_flag"].astype(str).str.upper() == "VARIABLE").to_numpy()\
            if "phot_variable_flag" in refcat else np.zeros(len(refcat), bool)
        ok = ((src["psfFlux"] / src["psfFluxErr"] > config.photometry_min_snr).to_numpy()
              & ~src["bad_pixels"].to_numpy() & ~variable[ref_idx]
              & src.get("isolated", pd.Series(True, index=src.index)).to_numpy(bool)
              & np.isfinite(ref_mag[ref_idx]))
        if ok.sum() < config.min_photometry_stars:
            raise StageError(f"too few stars for a zero point: {int(ok.sum())} matched stars "
                             f"with S/N > {config.photometry_min_snr:g}, need "
                             f"{config.min_photometry_stars}")
        mag_err = 2.5 / np.log(10) * ref_flux_err[ref_idx][ok] / ref_flux[ref_idx][ok]
        zp, zp_err, zp_used = _zero_point(
            ref_mag[ref_idx][ok], np.nan_to_num(mag_err, nan=0.01),
            src["psfFlux"].to_numpy()[ok], src["psfFluxErr"].to_numpy()[ok],
            config.photometry_clip_sigma)
        photo_calib = PhotoCalib.from_zero_point(zp, zp_err)
        sources.loc[src.index[ok][zp_used], "calib_photometry_used"] = True
        quality.update(zero_point=zp, zero_point_err_mmag=1000 * zp_err,
                       n_photometry_stars=float(zp_used.sum()))
    if wcs is not None:
        ra, dec = wcs.all_pix2world(sources["x"].to_numpy(), sources["y"].to_numpy(), 0)
        sources["ra"], sources["dec"] = ra, dec
    else:
        sources["ra"], sources["dec"] = np.nan, np.nan
    scale = photo_calib.calibration_mean if photo_calib is not None else np.nan
    for column in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr"):
        sources[column] = sources[column] * scale
    out = Exposure(image=exposure.image, variance=exposure.variance, mask=exposure.mask,
                   psf=exposure.psf, wcs=wcs, photo_calib=photo_calib,
                   visit_info=exposure.visit_info, detector_info=exposure.detector_info,
                   metadata=exposure.metadata.copy())
    out.metadata["OBSTYPE"] = ("calexp", "calibrated exposure")
    log.debug("calibrate: %s", quality)
    return CalibrateResult(out, sources, quality)
