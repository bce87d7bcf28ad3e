"""What differencing needs from an image, measured quickly: background, masks, bright stars, PSF.

A full single-visit characterization (``apqa process``) detects and measures every source
several times; PSF matching needs much less: the sky removed, saturated pixels and cosmic rays
masked, which pixels hold sources (for noise statistics), a PSF model and a list of bright
stars for the matching kernel. Bright stars are found on binned pixels (a 4x4 bin keeps a star
of S/N 10 well above threshold at a sixteenth of the cost) and measured at full resolution.

``prepare_for_difference`` returns a new exposure and leaves its input alone, unless told it may
reuse the input's planes (``overwrite_input``, for callers that read the image only for this).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sep
from pydantic import Field
from scipy.ndimage import binary_dilation, label

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, MoffatPsf
from apqa.datamodel.psf import Psf
from apqa.errors import StageError
from apqa.log import get_logger
from apqa.pipeline.background import clipped_rms, subtract_binned_background
from apqa.pipeline.cosmic_rays import (
    CosmicRayConfig,
    detect_cosmic_rays,
    sharpest_star_contrast,
)
from apqa.pipeline.interpolate import interpolate_masked
from apqa.pipeline.moments import windowed_moments
from apqa.pipeline.photometry import aperture_correction, psf_flux
from apqa.pipeline.pixels import any_in_box, bin_sum, boxes, upsample
from apqa.pipeline.psf_model import PsfModelConfig, fit_psf, psf_star_candidates

SIGMA_TO_FWHM = 2.3548
_FLAGGED = ("SAT", "BAD", "CR", "NO_DATA", "INTRP")
log = get_logger(__name__)

#: Sources at least this bright (aperture S/N) show the sharpness of the PSF's core.
_CORE_SNR = 50.0


class PrepareConfig(ConfigModel):
    """Settings of the light preparation for differencing."""

    background_mesh: int = Field(128, ge=16, description="sky mesh size (pixels)")
    background_filter: int = Field(3, ge=1, description="median filter over meshes")
    binning: int = Field(4, ge=1, le=8, description="pixels binned per axis for detection")
    detection_threshold: float = Field(
        3.0, gt=0, description="binned-pixel S/N of the source footprints (DETECTED plane)")
    min_snr: float = Field(8.0, gt=0, description="sources measured at full resolution")
    saturation_grow: int = Field(2, ge=0, description="SAT grown along columns (bleed ends)")
    cosmic_rays: bool = Field(True, description="find, mask (CR) and interpolate cosmic rays")
    cosmic_ray: CosmicRayConfig = Field(default_factory=CosmicRayConfig)
    calibration_aperture_fwhm: float = Field(
        3.5, gt=0, description="aperture radius (FWHM) that PSF fluxes are corrected to")
    psf: PsfModelConfig = Field(default_factory=PsfModelConfig)


@dataclass
class PreparedImage:
    """A background-subtracted exposure with its PSF, the sources measured, quality numbers."""

    exposure: Exposure
    # Columns of equal length: x, y, snr, flux, apFlux, apFluxErr, ixx, iyy, ixy,
    # bad_pixels, label (the source's footprint in the segmentation map), psf_used.
    sources: dict[str, np.ndarray]
    quality: dict[str, float] = field(default_factory=dict)


class _BinnedLabels:
    """A segmentation map of binned pixels seen at full resolution (``labels[wy, wx]``)."""

    def __init__(self, segmap: np.ndarray, factor: int) -> None:
        self.segmap, self.factor = segmap, factor

    def __getitem__(self, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        wy, wx = index
        height, width = self.segmap.shape
        return self.segmap[np.minimum(wy // self.factor, height - 1),
                           np.minimum(wx // self.factor, width - 1)]


def _saturation(exposure: Exposure, grow: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels (ys, xs) at or above the saturation level, grown along columns (bleed-trail
    ends); None when the level is unknown or nothing saturates."""
    level = exposure.detector_info.saturation if exposure.detector_info else np.inf
    if not np.isfinite(level):
        return None
    ys, xs = np.nonzero(exposure.image >= level)
    if ys.size == 0:
        return None
    ys = np.concatenate([np.clip(ys + d, 0, exposure.height - 1) for d in range(-grow, grow + 1)])
    return ys, np.tile(xs, 2 * grow + 1)


def _find_sources(image: np.ndarray, variance: np.ndarray, masked: np.ndarray,
                  config: PrepareConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Footprints of binned pixels above threshold (at least two connected pixels) and their
    sums: position, second moments, flux and S/N in binned pixels; and the label image."""
    factor = config.binning
    # Bins holding a masked pixel take no part (missing pixels have infinite variance).
    data = bin_sum(image, factor)
    var = bin_sum(variance, factor)
    bad = bin_sum(masked, factor) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        above = (data > config.detection_threshold * np.sqrt(var)) & ~bad
    labels, n = label(above)
    if n == 0:
        return {name: np.zeros(0) for name in ("x", "y", "x2", "y2", "flux", "snr", "npix")}, labels
    index = labels.ravel()
    on = index > 0
    index = index[on]
    yy, xx = np.divmod(np.nonzero(on)[0], data.shape[1])
    weight = np.clip(data.ravel()[on], 0, None).astype(np.float64)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=values, minlength=n + 1)[1:]

    npix = np.bincount(index, minlength=n + 1)[1:]
    flux = total(data.ravel()[on].astype(np.float64))
    wsum = np.maximum(total(weight), 1e-30)
    x = total(weight * xx) / wsum
    y = total(weight * yy) / wsum
    x2 = total(weight * xx * xx) / wsum - x * x
    y2 = total(weight * yy * yy) / wsum - y * y
    snr = flux / np.sqrt(np.maximum(total(var.ravel()[on].astype(np.float64)), 1e-30))
    objects = {"x": x, "y": y, "x2": x2, "y2": y2, "flux": flux, "snr": snr, "npix": npix}
    # Single noise pixels are not sources; drop them from the catalog and the footprints.
    single = np.r_[False, npix < 2]
    labels[single[labels]] = 0
    return objects, labels


def _centroids(image: np.ndarray, masked: np.ndarray, x: np.ndarray, y: np.ndarray,
               sigma: float, iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (the window follows the source; steps of at most 1 px).

    The pixels are gathered once, with a margin for the steps; each pass weights them with the
    separable window truncated to its current box (two small matrix products per source).
    """
    half = max(3, int(np.ceil(3 * sigma)))
    margin = iterations - 1  # the window's box moves at most 1 px per pass before the last
    off = np.arange(-half - margin, half + margin + 1)
    x, y = x.astype(np.float64), y.astype(np.float64)
    ix0, iy0 = np.rint(x).astype(int), np.rint(y).astype(int)
    box = boxes(image, ix0, iy0, half + margin)
    box[boxes(masked, ix0, iy0, half + margin)] = 0
    cols = (ix0[:, None] + off[None, :]).astype(np.float64)  # pixel coordinates of the box
    rows_y = (iy0[:, None] + off[None, :]).astype(np.float64)
    for _ in range(iterations):
        ix, iy = np.rint(x), np.rint(y)
        dx = cols - x[:, None]
        dy = rows_y - y[:, None]
        inside_x = np.abs(cols - ix[:, None]) <= half
        inside_y = np.abs(rows_y - iy[:, None]) <= half
        gx = np.where(inside_x, np.exp(-dx**2 / (2 * sigma**2)), 0.0)
        gy = np.where(inside_y, np.exp(-dy**2 / (2 * sigma**2)), 0.0)
        # Window over x for each row (batched matrix products), then over y.
        rows = np.matmul(box, np.stack([gx, gx * dx], axis=2).astype(np.float32))  # (n, K, 2)
        total = (rows[:, :, 0] * gy).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # A windowed centroid moves half as far as the offset for a matched window.
            step_x = np.clip(2 * (rows[:, :, 1] * gy).sum(axis=1) / total, -1, 1)
            step_y = np.clip(2 * (rows[:, :, 0] * gy * dy).sum(axis=1) / total, -1, 1)
        ok = np.isfinite(step_x) & np.isfinite(step_y) & (total > 0)
        x = np.where(ok, x + np.where(ok, step_x, 0), x)
        y = np.where(ok, y + np.where(ok, step_y, 0), y)
    return x, y


def _measure(image: np.ndarray, variance: np.ndarray, masked: np.ndarray, flagged: np.ndarray,
             objects: dict[str, np.ndarray], config: PrepareConfig
             ) -> tuple[dict[str, np.ndarray], float]:
    """Full-resolution positions, aperture fluxes and windowed moments of the sources bright
    enough to matter, and the stellar FWHM (pixels) from their sizes."""
    factor = config.binning
    keep = np.nonzero(objects["snr"] >= config.min_snr)[0]
    bright = objects["snr"][keep] > 3 * config.min_snr
    x = factor * objects["x"][keep] + (factor - 1) / 2
    y = factor * objects["y"][keep] + (factor - 1) / 2
    # Binned second moments, deconvolved from the box of the binning, give a first size
    # (footprints cut at the threshold make it small: the windowed moments correct it).
    sigma_b = np.sqrt(np.clip(factor**2 * (objects["x2"][keep] + objects["y2"][keep]) / 2
                              - (factor**2 - 1) / 12, 0.25, None))
    sigma = float(np.percentile(sigma_b[bright], 35)) if bright.sum() >= 5 else float(
        np.median(sigma_b)) if sigma_b.size else 1.5
    # The size of the bright ones sets the window; then every source is measured with it.
    if bright.sum() >= 5:
        bx, by = _centroids(image, masked, x[bright], y[bright], sigma)
        bxx, byy, _ = windowed_moments(image, bx, by, sigma)
        size = np.sqrt((bxx + byy) / 2)
        if np.isfinite(size).sum() >= 5:
            # The stellar locus is the lower middle of the bright sources' sizes (the window
            # is divided out of the moments, so one pass is enough).
            sigma = float(np.nanpercentile(size, 35))
    x, y = _centroids(image, masked, x, y, sigma)
    ixx, iyy, ixy = windowed_moments(image, x, y, sigma)
    fwhm = SIGMA_TO_FWHM * sigma
    # Missing pixels (infinite variance) are all masked: sep skips them, so the variance
    # plane needs no cleaned copy.
    flux, flux_err, ap_flag = sep.sum_circle(image, x, y, config.calibration_aperture_fwhm * fwhm,
                                             var=variance, mask=masked, subpix=0)
    snr = flux / np.where(flux_err > 0, flux_err, np.inf)
    sources = {
        "x": x, "y": y, "flux": flux, "apFlux": flux, "apFluxErr": flux_err, "snr": snr,
        "ixx": ixx, "iyy": iyy, "ixy": ixy,
        "bad_pixels": any_in_box(flagged, x, y, max(1, int(2 * fwhm))) | (ap_flag != 0)
        | ~np.isfinite(ixx),
        "label": keep + 1,  # the source's label in the segmentation map
    }
    return sources, fwhm


def find_bright_sources(exposure: Exposure, config: PrepareConfig | None = None
                        ) -> dict[str, np.ndarray]:
    """Sources of a background-subtracted exposure above ``config.min_snr``, found on binned
    pixels and measured at full resolution: columns x, y, snr, flux, moments, ``bad_pixels``.

    Examples
    --------
    >>> stars = find_bright_sources(calexp)  # doctest: +SKIP
    >>> stars["x"][stars["snr"] > 10]  # doctest: +SKIP
    """
    config = config or PrepareConfig()
    masked = exposure.mask.is_set(["NO_DATA", "BAD", "SAT"])
    image = np.ascontiguousarray(exposure.image, np.float32)
    objects, _ = _find_sources(image, exposure.variance, masked, config)
    if objects["x"].size == 0:
        return {name: np.zeros(0) for name in ("x", "y", "snr")}
    flagged = exposure.mask.is_set([p for p in _FLAGGED if p in exposure.mask.planes])
    sources, _ = _measure(image, exposure.variance, masked, flagged, objects, config)
    return sources


def _psf_model(image: np.ndarray, variance: np.ndarray, sources: dict[str, np.ndarray],
               segmap: np.ndarray, fwhm: float, config: PrepareConfig
               ) -> tuple[Psf, np.ndarray, float, bool]:
    """PSF model fitted on the bright isolated point sources: (psf, row positions of the
    sources it used, residual chi^2, whether it is the Moffat fallback)."""
    candidates = psf_star_candidates(sources, fwhm, config.psf)
    # fit_psf ignores pixels of footprints other than the star's own (its segmap label).
    fit = fit_psf(image, variance, sources["x"][candidates], sources["y"][candidates], fwhm,
                  image.shape, config.psf, labels=_BinnedLabels(segmap, config.binning),
                  label_ids=sources["label"][candidates])
    used = candidates[fit.used]
    if np.isfinite(fit.psf.fwhm):
        return fit.psf, used, fit.residual_chi2, False
    # No shape to measure: the few "stars" were noise-dominated or galaxies (a deep
    # extragalactic field). A Moffat of the sources' size keeps differencing going; the
    # warning and the quality flag say that its PSFs are a guess.
    log.warning("PSF model from %d sources has no measurable shape (too few point sources?): "
                "using a Moffat of FWHM %.2f px from the sources' sizes", len(used), fwhm)
    height, width = image.shape
    return MoffatPsf(width, height, [fwhm]), used, fit.residual_chi2, True


def prepare_for_difference(exposure: Exposure, config: PrepareConfig | None = None,
                           overwrite_input: bool = False, psf: Psf | None = None
                           ) -> PreparedImage:
    """Background-subtracted copy of ``exposure`` with masks, PSF model and bright sources.

    Parameters
    ----------
    exposure
        A reduced image (flat-fielded; sky may or may not have been subtracted) with its
        variance plane, as :meth:`Exposure.from_fits` reads a user's FITS file.
    config
        Settings.
    overwrite_input
        Work in the input's image and mask planes instead of copies (when they are writeable
        native float32 and int): saves two image-sized buffers; the input is changed.
    psf
        A PSF model to use instead of fitting one (e.g. :func:`~apqa.datamodel.psf_file.
        read_psf_image`); its core also bounds what counts as a cosmic ray.

    Returns
    -------
    PreparedImage
        The exposure with the sky removed, SAT (grown along columns), CR and INTRP (cosmic
        rays interpolated) and DETECTED planes, a :class:`~apqa.datamodel.PolynomialPsf` and
        ``APCORR`` in its metadata; the sources measured (x, y, snr, ...); quality numbers.

    Raises
    ------
    StageError
        A flat or empty image, or too few stars for a PSF model (the message gives the count).
    """
    config = config or PrepareConfig()
    saturated = _saturation(exposure, config.saturation_grow)
    reuse = overwrite_input and exposure.mask.array.flags.writeable
    mask = exposure.mask if reuse else exposure.mask.copy()
    if saturated is not None:
        mask.set("SAT", saturated)
    masked = mask.is_set(["NO_DATA", "BAD", "SAT"])
    image = exposure.image
    if not (overwrite_input and image.dtype == np.float32 and image.flags.c_contiguous
            and image.flags.writeable):
        image = np.array(image, dtype=np.float32, order="C")
    sample = image[::7, ::7][~masked[::7, ::7]]  # a flat image is flat in any sample
    if not np.isfinite(sample).any() or np.ptp(sample) == 0:
        raise StageError("image is flat or empty: no background or sources to measure")
    variance = exposure.variance
    # Masked pixels may be NaN for the sky (they stay NaN); zeroed after it for what follows.
    sky_level = subtract_binned_background(image, masked, config.background_mesh,
                                           config.background_filter, config.binning)
    sky_rms = clipped_rms(image, masked)
    image[masked & ~np.isfinite(image)] = 0.0

    objects, segmap = _find_sources(image, variance, masked, config)
    if objects["x"].size == 0:
        raise StageError("no sources found: PSF matching needs stars")
    sources, fwhm = _measure(image, variance, masked, mask.is_set(list(_FLAGGED)), objects,
                             config)
    n_cr = 0
    if config.cosmic_rays:
        # Stars' own cores bound what counts as too sharp: a core on broad wings is much
        # peakier than the FWHM from moments says, and must not be taken for cosmic rays.
        core = (sources["snr"] >= _CORE_SNR) & ~sources["bad_pixels"]
        sharpest = sharpest_star_contrast(image, sources["x"][core], sources["y"][core])
        if psf is not None:
            kernel = psf.image_at((image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2)
            sharpest = max(sharpest, sharpest_star_contrast(kernel, [kernel.shape[1] // 2],
                                                            [kernel.shape[0] // 2]))
        crs = detect_cosmic_rays(image, variance, 0.0, masked, fwhm, config.cosmic_ray,
                                 sharpest)
        n_cr = int(crs.sum())
        if n_cr:
            mask.set("CR", crs)
            fill = crs | mask.is_set(["BAD", "SAT"])
            image = interpolate_masked(image, fill | mask.is_set("NO_DATA"), targets=fill)
            mask.set("INTRP", fill)
            sources["bad_pixels"] |= any_in_box(crs, sources["x"], sources["y"],
                                                max(1, int(2 * fwhm)))
    grown = binary_dilation(segmap > 0, iterations=1)
    mask.set("DETECTED", upsample(grown, config.binning, image.shape))

    if psf is None:
        psf, used, residual_chi2, psf_fallback = _psf_model(image, variance, sources, segmap,
                                                            fwhm, config)
    else:  # given: its aperture correction is measured on the stars a fit would have used
        used = psf_star_candidates(sources, fwhm, config.psf)
        residual_chi2, psf_fallback = float("nan"), False
    usable = ~mask.is_set(["NO_DATA", "BAD", "SAT", "CR"])
    star_flux, _, _, _ = psf_flux(image, variance, usable, psf, sources["x"][used],
                                  sources["y"][used])
    ap_corr, ap_corr_err = aperture_correction(star_flux, sources["apFlux"][used],
                                               sources["apFluxErr"][used])
    sources["psf_used"] = np.zeros(sources["x"].size, bool)
    sources["psf_used"][used] = True
    metadata = exposure.metadata.copy()
    metadata["APCORR"] = (float(ap_corr), "aperture correction of PSF fluxes")
    metadata["FWHMEST"] = (fwhm, "[px] FWHM from the sizes of bright sources")
    if not 0.67 < ap_corr < 1.5:
        log.warning("PSF fluxes of the PSF stars are %.2f times their aperture fluxes: the PSF "
                    "model does not describe them (few or extended 'stars'?)", 1 / ap_corr)
    out = Exposure(image=image, variance=variance, mask=mask, psf=psf, wcs=exposure.wcs,
                   photo_calib=exposure.photo_calib, visit_info=exposure.visit_info,
                   detector_info=exposure.detector_info, metadata=metadata)
    quality = {
        "psf_fwhm_px": float(psf.fwhm),
        "psf_fallback": float(psf_fallback),
        "psf_residual_chi2": residual_chi2,
        "n_psf_stars": float(len(used)),
        "n_sources": float(sources["x"].size),
        "background_rms": sky_rms,
        "background_level": sky_level,
        "cr_pixels": float(n_cr),
        "aperture_correction": float(ap_corr),
        "aperture_correction_err": float(ap_corr_err),
    }
    return PreparedImage(out, sources, quality)
