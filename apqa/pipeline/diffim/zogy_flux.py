"""ZOGY's flux ratio F_r / F_n: bright stars for the fit, the cross-convolution kernels, the
robust fit itself, and the ratio from the photometric calibrations.

Split from :mod:`apqa.pipeline.diffim.zogy`, which holds the public API and the main flow.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from apqa.datamodel import Exposure
from apqa.datamodel.psf import convolve_full
from apqa.errors import StageError
from apqa.log import get_logger
from apqa.pipeline.diffim.zogy_kernels import _cell_psf_kernels
from apqa.pipeline.diffim.zogy_tiles import _cell_bounds
from apqa.pipeline.neighbours import close_pairs
from apqa.pipeline.pixels import boxes

if TYPE_CHECKING:
    from apqa.pipeline.diffim.zogy_types import ZogyConfig

# The flux ratio's messages keep the logger of the zogy module they come from.
log = get_logger("apqa.pipeline.diffim.zogy")


def _find_stars(snr_half: np.ndarray, usable: np.ndarray, threshold: float, fwhm: float,
                margin: int, max_stars: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixels of the brightest peaks of a half-resolution S/N map.

    Peaks are local maxima above ``threshold``; of two closer than 1 FWHM only the brighter is
    kept. A star must be ``margin`` pixels from the edges with no unusable pixel within
    ``margin``. Positions are good to a pixel, which is all the cross-convolution flux ratio
    needs (:func:`_fit_flux_ratio`).
    """
    height, width = usable.shape
    iy, ix = np.nonzero(snr_half[1:-1, 1:-1] > threshold)
    iy, ix = iy + 1, ix + 1
    if iy.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    value = snr_half[iy, ix]
    is_peak = np.ones(iy.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_peak &= value >= snr_half[iy + dy, ix + dx]
    order = np.argsort(-value[is_peak])
    y, x = 2 * iy[is_peak][order], 2 * ix[is_peak][order]
    inside = (y >= margin) & (y < height - margin) & (x >= margin) & (x < width - margin)
    y, x = y[inside], x[inside]
    if y.size > 1:
        keep = np.ones(y.size, bool)
        keep[close_pairs(x, y, fwhm)[1]] = False  # the fainter of each pair (by decreasing S/N)
        y, x = y[keep], x[keep]
    chosen: list[int] = []
    for i, (yi, xi) in enumerate(zip(y, x, strict=True)):
        if usable[yi - margin:yi + margin + 1, xi - margin:xi + margin + 1].all():
            chosen.append(i)
            if len(chosen) == max_stars:
                break
    return x[chosen], y[chosen]


def _cross_kernels(psf_science: np.ndarray, psf_template: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Filters giving both images the same PSF, each matched-filtered with it.

    ``K_n = P_r (x) Q(-x)`` and ``K_r = P_n (x) Q(-x)`` with ``Q = P_n (x) P_r``: N (x) K_n and
    R (x) K_r are the two images cross-convolved to the common PSF Q, smoothed by Q. Cropped
    where the outer frame holds less than 1e-6 of the kernel's absolute sum, and put on the
    same odd size.
    """
    q = convolve_full(psf_science, psf_template)
    flipped = q[::-1, ::-1]
    k_n = convolve_full(psf_template, flipped)
    k_r = convolve_full(psf_science, flipped)
    size = max(k_n.shape[0], k_r.shape[0])
    k_n, k_r = (np.pad(k, (size - k.shape[0]) // 2) for k in (k_n, k_r))
    half = size // 2
    total = np.abs(k_n).sum() + np.abs(k_r).sum()
    while half > 1:
        inner = slice(size // 2 - half + 1, size // 2 + half)
        outer = (np.abs(k_n).sum() - np.abs(k_n[inner, inner]).sum()
                 + np.abs(k_r).sum() - np.abs(k_r[inner, inner]).sum())
        if outer > 1e-6 * total:
            break
        half -= 1
    crop = slice(size // 2 - half, size // 2 + half + 1)
    return k_n[crop, crop], k_r[crop, crop]


def _fit_flux_ratio(science: np.ndarray, template: np.ndarray, var_science: np.ndarray,
                    var_template: np.ndarray, bad: np.ndarray,
                    cross: list[tuple[np.ndarray, np.ndarray]], group: np.ndarray,
                    x: np.ndarray, y: np.ndarray, clip: float
                    ) -> tuple[float, float, int]:
    """F_r / F_n from the stars at pixels (x, y), on the cross-convolved images.

    Star ``i`` is filtered with the kernels ``cross[group[i]]`` (those of its tile, whose PSFs
    are the ones valid there). ``bad`` pixels (0 in the images) count with no variance.

    For constant sources ``R (x) P_n = (F_r / F_n) N (x) P_r`` holds pixel by pixel: it is the
    condition for them to vanish from D. So the ratio of the two filtered images
    (:func:`_cross_kernels`) at a star's peak is F_r / F_n whatever its neighbours, its exact
    centroid or its profile; PSF fluxes on the raw images are not, because blends and centroid
    errors bias the sharper and the broader image differently (0.2-0.5% in tests).

    Transients, variables and stars hit by defects in one image only are outliers, rejected
    by an iterative clip around the median in units of each ratio's expected error, with the
    error scale itself measured (PSF-model errors make bright stars scatter more than noise
    says). The estimate is then a weighted ratio of sums, ``sum(w a_r) / sum(w a_n)`` with
    weights from the errors alone: weights from the measured values would favour stars whose
    science value scattered up and bias the ratio low.

    Returns
    -------
    ratio, error, n_used
    """
    if x.size == 0:
        return float("nan"), float("nan"), 0
    an, ar, en, er = (np.full(x.size, np.nan) for _ in range(4))
    for g, (k_science, k_template) in enumerate(cross):
        sel = group == g
        if not sel.any():
            continue
        sx, sy, half = x[sel], y[sel], k_science.shape[0] // 2
        # Correlation form: a(p) = sum_u image(p - u) K(u) = sum_v image(p + v) K(-v).
        kn = k_science[::-1, ::-1][None]
        kr = k_template[::-1, ::-1][None]
        an[sel] = (boxes(science, sx, sy, half) * kn).sum(axis=(1, 2))
        ar[sel] = (boxes(template, sx, sy, half) * kr).sum(axis=(1, 2))
        bad_boxes = boxes(bad, sx, sy, half)
        vn = np.where(bad_boxes, np.float32(0), boxes(var_science, sx, sy, half))
        vr = np.where(bad_boxes, np.float32(0), boxes(var_template, sx, sy, half))
        en[sel] = np.sqrt((vn * kn**2).sum(axis=(1, 2)))
        er[sel] = np.sqrt((vr * kr**2).sum(axis=(1, 2)))
    ok = np.isfinite(an) & np.isfinite(ar) & (an > 0) & (en > 0) & (er > 0)
    an, en, ar, er = an[ok], en[ok], ar[ok], er[ok]
    if an.size == 0:
        return float("nan"), float("nan"), 0
    ratio = ar / an
    keep = np.ones(ratio.size, bool)
    centre = float(np.median(ratio))
    scale = 1.0
    for _ in range(10):
        # Error of each ratio at the current estimate (a_r ~ centre a_n), not at its own value.
        sigma = np.sqrt(er**2 + (centre * en) ** 2) / an
        z = (ratio - centre) / sigma
        scale = max(1.0, 1.4826 * float(np.median(np.abs(z[keep]))))
        new_keep = np.abs(z) < clip * scale
        if new_keep.sum() == 0:
            break
        converged = np.array_equal(new_keep, keep)
        keep = new_keep
        centre = float(np.median(ratio[keep]))
        if converged:
            break
    weight = 1.0 / (er[keep] ** 2 + (centre * en[keep]) ** 2)
    total = float((weight * an[keep]).sum())
    mean = float((weight * ar[keep]).sum()) / total
    return mean, scale * math.sqrt(float(weight.sum())) / total, int(keep.sum())


#: Lowest matched-filter S/N the flux-ratio fit falls back to when too few brighter stars.
FLOOR_SNR = 5.0


def fit_flux_ratio_on_stars(img_n: np.ndarray, img_r: np.ndarray, var_n: np.ndarray,
                            var_r: np.ndarray, bad: np.ndarray, snr_half: np.ndarray,
                            usable: np.ndarray,
                            cross: list[tuple[np.ndarray, np.ndarray]], cells_y: np.ndarray,
                            cells_x: np.ndarray, fwhm: float, min_snr: float, min_stars: int,
                            max_stars: int, clip: float) -> tuple[float, float, int, float]:
    """F_r / F_n fitted on stars, lowering the S/N threshold when too few stars pass it.

    Thresholds ``min_snr``, half and a quarter of it (not below :data:`FLOOR_SNR`) are tried
    in turn until ``min_stars`` stars survive the fit: a small cut-out often holds only a
    couple of stars at S/N 20, while a handful at S/N 5-10 still give the ratio to ~1%
    (its error is returned, so a poorer fit shows). Star ``i`` is filtered with the cross
    kernels of the cell of (``cells_y``, ``cells_x``) it falls in.

    Returns
    -------
    ratio, error, n_used, threshold
        ``ratio`` is NaN (and ``n_used`` below ``min_stars``) when no threshold gives enough.
    """
    margin = max(k.shape[0] for k, _ in cross) // 2
    lower = {max(FLOOR_SNR, min_snr / f) for f in (2, 4)} if min_snr > FLOOR_SNR else set()
    thresholds = sorted({min_snr} | lower, reverse=True)
    best = (float("nan"), float("nan"), 0, min_snr)
    for threshold in thresholds:
        x, y = _find_stars(snr_half, usable, threshold, fwhm, margin, max_stars)
        group = (np.clip(np.searchsorted(cells_y, y, side="right") - 1, 0, len(cells_y) - 2)
                 * (len(cells_x) - 1)
                 + np.clip(np.searchsorted(cells_x, x, side="right") - 1, 0,
                           len(cells_x) - 2))
        ratio, err, n_used = _fit_flux_ratio(img_n, img_r, var_n, var_r, bad, cross, group,
                                             x, y, clip)
        if n_used >= min_stars and ratio > 0:
            return ratio, err, n_used, threshold
        if n_used > best[2]:
            best = (float("nan"), float("nan"), n_used, threshold)
    return best


def _initial_flux_ratio(science: Exposure, template: Exposure) -> float | None:
    """F_r/F_n from the photometric calibrations: a source of f nJy has f / c counts.

    So template counts per science count = c_science / c_template.
    """
    if science.photo_calib is None or template.photo_calib is None:
        return None
    return science.photo_calib.calibration_mean / template.photo_calib.calibration_mean


class FluxRatio(NamedTuple):
    """F_r / F_n as chosen by :func:`choose_flux_ratio`, with how it was found."""

    value: float
    #: Its error (NaN unless fitted).
    error: float
    #: Stars the fit used (0 unless fitted).
    n_stars: int
    #: The S/N threshold those stars passed (NaN unless fitted).
    min_snr: float
    #: The ratio from the photometric calibrations (NaN without them).
    calibrated: float


def choose_flux_ratio(science: Exposure, template: Exposure, img_n: np.ndarray,
                      img_r: np.ndarray, bad: np.ndarray, snr_n: np.ndarray,
                      usable: np.ndarray, cells_y: np.ndarray, cells_x: np.ndarray,
                      cell_psfs: list[tuple[np.ndarray, np.ndarray, float]], fwhm: float,
                      config: ZogyConfig) -> FluxRatio:
    """F_r / F_n: ``config.flux_ratio`` when set, else fitted on bright stars
    (:func:`fit_flux_ratio_on_stars`), else from the photometric calibrations.

    ``img_*`` are the tapered images (0 on ``bad`` pixels), ``snr_n`` the science's
    half-resolution S/N map where stars are found, ``usable`` the pixels they may touch, and
    ``cell_psfs`` the PSF pairs of the cells between ``cells_y`` and ``cells_x`` (one cell:
    the image is then cut into 3 x 3 for the fit).

    Raises
    ------
    StageError
        No ratio given, too few stars to fit and no calibrations.
    """
    calib_ratio = _initial_flux_ratio(science, template)
    calibrated = calib_ratio if calib_ratio is not None else float("nan")
    if config.flux_ratio is not None:
        return FluxRatio(float(config.flux_ratio), float("nan"), 0, float("nan"), calibrated)
    if config.fit_flux_ratio:
        # Each star is compared through the PSFs valid where it is: those of its tile, or of
        # a 3 x 3 grid when not tiling (PSFs vary, and the centre's would bias the ratio by
        # ~0.5% for a 10% change of FWHM across the image).
        if len(cells_y) == 2 and len(cells_x) == 2:
            height, width = science.shape
            cells_y = _cell_bounds(height, max(1, height // 3))
            cells_x = _cell_bounds(width, max(1, width // 3))
            cell_psfs = _cell_psf_kernels(science, template, cells_y, cells_x,
                                          config.recenter_psf)
        cross = [_cross_kernels(pn, pr) for pn, pr, _ in cell_psfs]
        fitted, err, n_used, snr_used = fit_flux_ratio_on_stars(
            img_n, img_r, science.variance, template.variance, bad, snr_n, usable, cross,
            cells_y, cells_x, fwhm, config.flux_ratio_min_snr, config.flux_ratio_min_stars,
            config.flux_ratio_max_stars, config.flux_ratio_clip)
        if np.isfinite(fitted):
            if snr_used < config.flux_ratio_min_snr:
                log.warning("zogy: fewer than %d stars with S/N > %g for the flux ratio; "
                            "fitted on %d with S/N > %g: %.4f +- %.4f",
                            config.flux_ratio_min_stars, config.flux_ratio_min_snr, n_used,
                            snr_used, fitted, err)
            return FluxRatio(fitted, err, n_used, snr_used, calibrated)
        log.warning("zogy: %d usable stars with S/N > %g for the flux-ratio fit (need %d)",
                    n_used, snr_used, config.flux_ratio_min_stars)
    if calib_ratio is None:
        raise StageError(
            f"zogy: no flux ratio: fewer than {config.flux_ratio_min_stars} unmasked stars "
            f"(S/N > {min(FLOOR_SNR, config.flux_ratio_min_snr):g}) to fit it, and no "
            "photo_calib on both exposures; set ZogyConfig.flux_ratio or give calibrated "
            "exposures")
    return FluxRatio(calib_ratio, float("nan"), 0, float("nan"), calibrated)
