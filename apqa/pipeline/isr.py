"""Instrument signature removal: bias, flat, saturation and bleed trails, defects, cosmic rays.

``run_isr`` is pure: it takes the raw exposure and calibration products and returns a new
exposure with its variance and mask planes (SAT, BAD, CR, INTRP, NO_DATA), plus quality numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sep
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import DetectorInfo, Exposure
from apqa.errors import InputError
from apqa.log import get_logger
from apqa.pipeline.cosmic_rays import CosmicRayConfig, count_cosmic_rays, detect_cosmic_rays
from apqa.pipeline.detect import size_pixel_stack
from apqa.pipeline.interpolate import interpolate_masked
from apqa.pipeline.pixels import grow_box

log = get_logger(__name__)
ADC_MAX = 65535.0


class IsrConfig(ConfigModel):
    """Instrument signature removal settings."""

    saturation_fraction: float = Field(
        0.98, gt=0, le=1, description="pixels above this fraction of SATURATE are saturated")
    bleed_grow: int = Field(2, ge=0, description="grow SAT along columns (bleed-trail ends)")
    flat_bad_threshold: float = Field(0.2, gt=0, description="flat below this: BAD pixel")
    cosmic_rays: CosmicRayConfig = Field(default_factory=CosmicRayConfig)
    detect_cosmic_rays: bool = True
    interpolate: bool = True
    interpolation_sigma: float = Field(1.5, gt=0, description="pixels")


@dataclass
class IsrResult:
    """The post-ISR exposure and its quality numbers."""

    exposure: Exposure
    quality: dict[str, float] = field(default_factory=dict)


def estimate_fwhm(image: np.ndarray, mask: np.ndarray) -> float:
    """Rough PSF FWHM (pixels) from the half-light radii of bright compact sources.

    Cosmic rays are sharper and galaxies broader than stars; the lower-middle of the size
    distribution of bright sources is the stellar locus.
    """
    # The central quarter of a large image holds plenty of stars and costs a quarter.
    height, width = image.shape
    if height * width > 4_000_000:
        cy, cx = height // 4, width // 4
        image, mask = image[cy:cy + height // 2, cx:cx + width // 2], \
            mask[cy:cy + height // 2, cx:cx + width // 2]
    data = np.ascontiguousarray(image, dtype=np.float32)
    mask = np.ascontiguousarray(mask)
    bkg = sep.Background(data, mask=mask)
    sub = data - bkg.back()
    size_pixel_stack(np.count_nonzero((sub > 20.0 * bkg.globalrms) & ~mask))
    objects = sep.extract(sub, 20.0, err=bkg.globalrms, mask=mask, minarea=9)
    if len(objects) < 3:
        return float("nan")
    radius, flag = sep.flux_radius(sub, objects["x"], objects["y"], 6.0 * objects["a"], 0.5,
                                   normflux=objects["flux"], subpix=5)
    radius = radius[(flag == 0) & (objects["flag"] == 0) & (radius > 0.8)]
    if radius.size < 3:
        return float("nan")
    return float(2.0 * np.percentile(radius, 35))


def _defect_mask(defects: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    bad = np.zeros(shape, bool)
    for row in defects.itertuples():
        bad[int(row.y0):int(row.y1) + 1, int(row.x0):int(row.x1) + 1] = True
    return bad


def run_isr(raw: Exposure, bias: Exposure | None = None, flat: Exposure | None = None,
            defects: pd.DataFrame | None = None, config: IsrConfig | None = None) -> IsrResult:
    """Remove the instrument signature from a raw exposure.

    Parameters
    ----------
    raw
        Raw exposure in ADU. Its ``detector_info`` gives gain (e-/ADU), read noise (e-) and the
        saturation level (ADU above bias).
    bias, flat
        Master bias (ADU) and master flat (normalized; its BAD plane marks defects). A raw
        exposure (``OBSTYPE = 'raw'``) needs a bias.
    defects
        Optional table of bad regions (x0, x1, y0, y1 inclusive).
    config
        Settings.

    Returns
    -------
    IsrResult
        Bias-subtracted, flat-fielded exposure with variance (ADU^2) and SAT, BAD, CR, INTRP,
        NO_DATA planes, and quality numbers: ``cr_count``, ``masked_fraction``,
        ``saturated_fraction``, ``bad_fraction``, ``fwhm_estimate``.
    """
    config = config or IsrConfig()
    det = raw.detector_info or DetectorInfo()
    is_raw = str(raw.metadata.get("OBSTYPE", "")).lower() == "raw"
    if is_raw and bias is None:
        raise InputError("raw exposure (OBSTYPE='raw'): a master bias is needed to process it")
    for name, frame in (("bias", bias), ("flat", flat)):
        if frame is not None and frame.shape != raw.shape:
            raise InputError(f"{name}: expected shape {raw.shape} (the exposure's), "
                             f"got {frame.shape}")
    mask = raw.mask.copy()
    image = raw.image.astype(np.float32, copy=True)
    no_data = mask.is_set("NO_DATA") | ~np.isfinite(image)
    if bias is not None:
        image -= bias.image
    # Saturation is judged before flat-fielding, on the bias-subtracted ADU it is defined in.
    saturated = np.zeros(raw.shape, bool)
    if np.isfinite(det.saturation):
        saturated |= image >= config.saturation_fraction * det.saturation
    if is_raw:
        saturated |= raw.image >= ADC_MAX
    if config.bleed_grow and saturated.any():
        saturated = grow_box(saturated, 0, config.bleed_grow)  # bleed trails run along columns
    mask.set("SAT", saturated)

    bad = np.zeros(raw.shape, bool)
    gain = det.gain if np.isfinite(det.gain) and det.gain > 0 else None
    # Only raw pixels still hold their photon counts; a user's reduced (often sky-subtracted)
    # image keeps the variance it was read with (measured from its own pixels). Built in
    # place, in float32: each temporary here is a full image.
    if is_raw and gain is not None:
        read_var = (det.read_noise / gain) ** 2 if np.isfinite(det.read_noise) else 0.0
        variance = np.clip(image, 0, None)  # counts before flat-fielding
        variance /= np.float32(gain)
        variance += np.float32(read_var)
    else:
        variance = raw.variance.astype(np.float32, copy=True)
    if flat is not None:
        bad |= (flat.image < config.flat_bad_threshold) | flat.mask.is_set("BAD")
        flat_sq = np.where(bad, np.float32(1), flat.image.astype(np.float32, copy=False))
        with np.errstate(divide="ignore", invalid="ignore"):
            image /= flat_sq
            flat_sq *= flat_sq
            variance /= flat_sq
        del flat_sq
        image[bad] = 0.0
    if defects is not None and len(defects):
        bad |= _defect_mask(defects, raw.shape)
    mask.set("BAD", bad)
    mask.set("NO_DATA", no_data)
    unusable = bad | no_data
    image[unusable] = 0.0

    excluded = unusable | saturated
    fwhm = estimate_fwhm(image, excluded)
    if not np.isfinite(fwhm):
        fwhm = 3.0
    crs = np.zeros(raw.shape, bool)
    if config.detect_cosmic_rays:
        bkg = sep.Background(np.ascontiguousarray(image), mask=excluded)
        crs = detect_cosmic_rays(image, variance, bkg.back(), excluded, fwhm, config.cosmic_rays)
        mask.set("CR", crs)
    if config.interpolate:
        fill = bad | saturated | crs
        image = interpolate_masked(image, fill | no_data, config.interpolation_sigma,
                                   targets=fill)
        mask.set("INTRP", fill)
        # Interpolated pixels carry the noise of their neighbours, not their own.
        variance = interpolate_masked(variance, fill | no_data, config.interpolation_sigma,
                                      targets=fill)
    variance[no_data] = np.inf
    image[no_data] = 0.0

    metadata = raw.metadata.copy()
    metadata["OBSTYPE"] = ("postisr", "bias-subtracted, flat-fielded")
    metadata["FWHMEST"] = (fwhm, "[px] rough PSF FWHM found by ISR")
    exposure = Exposure(image=image, variance=variance, mask=mask, psf=raw.psf, wcs=raw.wcs,
                        photo_calib=raw.photo_calib, visit_info=raw.visit_info,
                        detector_info=det, metadata=metadata)
    quality = {
        "cr_count": float(count_cosmic_rays(crs)),
        "cr_pixels": float(crs.sum()),
        "saturated_fraction": float(saturated.mean()),
        "bad_fraction": float(bad.mean()),
        "masked_fraction": float((saturated | bad | crs | no_data).mean()),
        "fwhm_estimate": fwhm,
    }
    log.debug("ISR: %s", quality)
    return IsrResult(exposure, quality)
