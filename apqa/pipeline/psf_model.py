"""PSF star selection and a PSFEx-like spatially varying pixel-basis PSF model.

Source lists are taken as :data:`~apqa.datamodel.columns.Columns` (a DataFrame or a dict of
numpy arrays) and stars are named by their row positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field
from scipy.ndimage import binary_dilation

from apqa.config import ConfigModel
from apqa.datamodel import PolynomialPsf, shift_kernels
from apqa.datamodel.columns import Columns
from apqa.datamodel.psf import n_polynomial_terms, polynomial_terms
from apqa.errors import StageError
from apqa.pipeline.neighbours import close_pairs
from apqa.pipeline.pixels import box_indices, boxes


class PsfModelConfig(ConfigModel):
    """PSF star selection and model settings."""

    min_snr: float = Field(30.0, gt=0)
    max_snr: float = Field(1e5, gt=0)
    max_stars: int = Field(400, ge=5)
    min_stars: int = Field(3, ge=2, description="fewer PSF stars: the stage fails")
    size_tolerance: float = Field(0.15, gt=0, description="allowed fractional size scatter")
    isolation_fwhm: float = Field(3.0, gt=0, description="no brighter-than-1% neighbour within")
    stamp_radius_fwhm: float = Field(3.0, gt=0, description="kernel half-size in FWHM")
    min_half_size: int = Field(7, ge=3)
    max_half_size: int = Field(25, ge=3)
    order: int = Field(2, ge=0, le=4, description="polynomial order of the spatial variation")
    clip_sigma: float = Field(4.0, gt=0)
    n_clip: int = Field(3, ge=0)


@dataclass
class PsfFitResult:
    """The model, how each candidate star fared, and how well the model describes them."""

    psf: PolynomialPsf
    chi2: np.ndarray  # chi^2/dof of each candidate against the model
    used: np.ndarray  # bool: the candidate is one of the stars the model rests on
    n_candidates: int
    residual_chi2: float  # median chi^2/dof of the PSF stars


def _column(sources: Columns, name: str, dtype: type = float) -> np.ndarray:
    return np.asarray(sources[name], dtype)


def isolated_sources(sources: Columns, radius: float, max_ratio: float = 0.01) -> np.ndarray:
    """True for sources with no neighbour brighter than ``max_ratio`` of them within
    ``radius`` pixels (``sources`` needs x, y, flux)."""
    flux = _column(sources, "flux")
    i, j = close_pairs(_column(sources, "x"), _column(sources, "y"), radius)
    spoiled = np.zeros(len(flux), bool)
    # A pair spoils the fainter source always and the brighter one if the ratio is large.
    spoiled[i[flux[j] > max_ratio * flux[i]]] = True
    spoiled[j[flux[i] > max_ratio * flux[j]]] = True
    return ~spoiled


def select_psf_candidates(sources: Columns, fwhm: float, config: PsfModelConfig) -> np.ndarray:
    """Row positions of the bright, unflagged, isolated point-like sources, brightest first.

    ``sources`` needs x, y, snr, flux, ixx, iyy and a boolean ``bad_pixels`` column (saturated,
    bad, cosmic-ray or interpolated pixels nearby).
    """
    snr = _column(sources, "snr")
    ok = ((snr > config.min_snr) & (snr < config.max_snr)
          & ~_column(sources, "bad_pixels", bool) & (_column(sources, "flux") > 0))
    cand = np.nonzero(ok & isolated_sources(sources, config.isolation_fwhm * fwhm))[0]
    if cand.size < 3:
        return cand
    # The stellar locus is the first tight cluster from the small end: stars share one size,
    # galaxies spread over many larger ones (and may outnumber them), cosmic rays are gone.
    size = _column(sources, "ixx")[cand] + _column(sources, "iyy")[cand]
    ordered = np.sort(size)
    upper = np.searchsorted(ordered, ordered * (1 + config.size_tolerance), side="right")
    members = upper - np.arange(ordered.size)
    needed = max(config.min_stars, int(0.05 * ordered.size))
    start = int(np.argmax(members >= needed)) if (members >= needed).any() else int(
        np.argmax(members))
    locus = float(np.median(ordered[start:upper[start]]))
    cand = cand[np.abs(size / locus - 1) < config.size_tolerance]
    return cand[np.argsort(-snr[cand], kind="stable")][:config.max_stars]


def psf_star_candidates(sources: Columns, fwhm: float, config: PsfModelConfig) -> np.ndarray:
    """:func:`select_psf_candidates`, and when that leaves fewer than twice ``min_stars``
    (small images, sparse fields), again accepting fainter (S/N 15) and less isolated (2 FWHM)
    stars."""
    candidates = select_psf_candidates(sources, fwhm, config)
    if len(candidates) < 2 * config.min_stars:
        relaxed = config.model_copy(update={"min_snr": min(config.min_snr, 15.0),
                                            "isolation_fwhm": min(config.isolation_fwhm, 2.0)})
        candidates = select_psf_candidates(sources, fwhm, relaxed)
    return candidates


def _star_stamps(image: np.ndarray, variance: np.ndarray, x: np.ndarray, y: np.ndarray,
                 half: int, labels: Any, own: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Stamps shifted so each star sits at the centre of its central pixel, their variances,
    and the pixels to ignore: other sources' footprints (``labels`` other than ``own``) and
    pixels without a finite variance. Masks are not shifted (at most half a pixel off)."""
    pad = 2
    big = half + pad
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    data = boxes(image, ix, iy, big).astype(np.float64)
    var = boxes(variance, ix, iy, big).astype(np.float64)
    centred = shift_kernels(data, -(x - ix), -(y - iy)).astype(np.float64)
    core = slice(pad, pad + 2 * half + 1)
    ignore = ~np.isfinite(var)
    if labels is not None and own is not None:
        # A label map may be a lookup (prepare's binned map): it is indexed by pixel arrays.
        window = labels[box_indices(ix, iy, big, image.shape)]
        ignore |= (window > 0) & (window != np.asarray(own)[:, None, None])
    return centred[:, core, core], var[:, core, core], ignore[:, core, core]


def _row_medians(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median of each row's ``valid`` values (0 for a row with none), as ``np.median`` of
    each row's selection would give, in one sort instead of a call per row.

    Examples
    --------
    >>> values = np.array([[3.0, 1.0, 2.0, 9.0], [4.0, 8.0, 6.0, 5.0]])
    >>> _row_medians(values, np.array([[True, True, True, False], [True] * 4])).tolist()
    [2.0, 5.5]
    """
    count = valid.sum(axis=1)
    ordered = np.sort(np.where(valid, values, np.nan), axis=1)  # NaN last
    rows = np.arange(values.shape[0])
    low = ordered[rows, np.maximum(count - 1, 0) // 2]
    high = ordered[rows, count // 2 - (count == 0)]
    return np.where(count > 0, (low + high) / 2, 0.0)


def _fit_flux_and_pedestal(stamps: np.ndarray, var: np.ndarray, model: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of stamp = flux * model + pedestal, per star."""
    w = 1.0 / np.clip(var, 1e-12, None)
    s_mm = (w * model * model).sum(axis=(1, 2))
    s_m = (w * model).sum(axis=(1, 2))
    s_1 = w.sum(axis=(1, 2))
    s_dm = (w * stamps * model).sum(axis=(1, 2))
    s_d = (w * stamps).sum(axis=(1, 2))
    det = s_mm * s_1 - s_m * s_m
    flux = (s_dm * s_1 - s_m * s_d) / det
    pedestal = (s_mm * s_d - s_m * s_dm) / det
    return flux, pedestal


def fit_psf(image: np.ndarray, variance: np.ndarray, x: np.ndarray, y: np.ndarray,
            fwhm: float, shape: tuple[int, int], config: PsfModelConfig | None = None,
            labels: Any = None, label_ids: np.ndarray | None = None) -> PsfFitResult:
    """Fit a :class:`~apqa.datamodel.PolynomialPsf` to background-subtracted star images.

    Each star (centred at ``x``, ``y``) is shifted to the centre of its central pixel (Fourier
    shift) and described as ``flux * model + pedestal``; every kernel pixel is a polynomial of
    position fitted by inverse-variance weighted least squares over the stars. Pixels in other
    sources' footprints (``labels``: a segmentation map, or a lookup indexed by pixel arrays,
    in which star ``i``'s own footprint is ``label_ids[i]``) and pixels deviating by more than
    ``clip_sigma`` are ignored, and stars with outlying chi^2 are dropped; the fit is repeated
    until nothing changes.

    Raises
    ------
    StageError
        When fewer than ``config.min_stars`` usable stars remain.
    """
    config = config or PsfModelConfig()
    half = int(np.clip(np.ceil(config.stamp_radius_fwhm * fwhm), config.min_half_size,
                       config.max_half_size))
    x, y = np.asarray(x, float), np.asarray(y, float)
    n_candidates = x.size
    if n_candidates < config.min_stars:
        raise StageError(f"too few PSF stars: found {n_candidates} isolated, unsaturated "
                         f"stars with S/N > {config.min_snr:g}, need at least {config.min_stars}")
    if labels is not None and label_ids is None:
        raise ValueError("fit_psf: labels need the stars' own label_ids")
    stamps, var, ignore = _star_stamps(image, variance, x, y, half, labels, label_ids)
    k = 2 * half + 1
    ignore = binary_dilation(ignore, structure=np.ones((1, 3, 3), bool), iterations=1)
    ignore[:, half, half] = False
    yy, xx = np.mgrid[:k, :k] - half
    ring = np.hypot(xx, yy) >= half - 1
    pedestal = _row_medians(stamps[:, ring], ~ignore[:, ring])
    flux = np.where(ignore, 0.0, stamps - pedestal[:, None, None]).sum(axis=(1, 2))
    height, width = shape
    u = (x - (width - 1) / 2) / (width / 2)
    v = (y - (height - 1) / 2) / (height / 2)
    keep = flux > 0
    order = config.order
    chi2 = np.full(len(x), np.nan)
    clipped = np.zeros(stamps.shape, bool)
    # Weights must not follow each pixel's own noise (a pixel that fluctuated up would get a
    # larger measured variance and less weight, biasing the core low): use a variance model,
    # sky variance from the ring plus a per-count term calibrated on the bright pixels.
    sky_var = np.median(var[:, ring], axis=1)
    weight_var = np.broadcast_to(sky_var[:, None, None], var.shape)
    for _ in range(config.n_clip + 2):
        # Enough stars for the polynomial? Drop the order rather than fail.
        while order > 0 and keep.sum() < 2 * n_polynomial_terms(order):
            order -= 1
        if keep.sum() < config.min_stars:
            raise StageError(f"too few PSF stars after clipping: {int(keep.sum())} of "
                             f"{n_candidates} candidates, need at least {config.min_stars}")
        coeffs = _weighted_pixel_fit(stamps, weight_var, ignore | clipped, flux, pedestal, u,
                                     v, keep, order)
        model = np.tensordot(polynomial_terms(u, v, order).T, coeffs, axes=1)
        model /= model.sum(axis=(1, 2), keepdims=True)
        signal = flux[:, None, None] * model
        bright = (signal > 10 * np.sqrt(sky_var)[:, None, None]) & ~ignore
        per_count = float(np.median((var[bright] - np.broadcast_to(
            sky_var[:, None, None], var.shape)[bright]) / signal[bright])) if bright.any() else 0.0
        weight_var = sky_var[:, None, None] + max(per_count, 0.0) * np.clip(signal, 0, None)
        # Refit each star's flux and pedestal against the model (linear in both).
        flux, pedestal = _fit_flux_and_pedestal(stamps, np.where(ignore, np.inf, var), model)
        resid = stamps - flux[:, None, None] * model - pedestal[:, None, None]
        pull2 = resid**2 / np.clip(var, 1e-12, None)
        new_clipped = pull2 > config.clip_sigma**2
        usable = ~(ignore | new_clipped)
        chi2 = np.where(usable, pull2, 0).sum(axis=(1, 2)) / np.maximum(usable.sum(axis=(1, 2))
                                                                        - 2, 1)
        med = np.median(chi2[keep])
        mad = 1.4826 * np.median(np.abs(chi2[keep] - med))
        new_keep = (flux > 0) & (chi2 < med + config.clip_sigma * max(mad, 0.05 * med))
        if np.array_equal(new_keep, keep) and np.array_equal(new_clipped, clipped):
            break
        keep, clipped = new_keep, new_clipped
    psf = PolynomialPsf(width, height, coeffs, order)
    return PsfFitResult(psf, chi2, keep, n_candidates, float(np.median(chi2[keep])))


def _weighted_pixel_fit(stamps: np.ndarray, var: np.ndarray, ignore: np.ndarray,
                        flux: np.ndarray, pedestal: np.ndarray, u: np.ndarray, v: np.ndarray,
                        keep: np.ndarray, order: int) -> np.ndarray:
    """Per-pixel weighted least squares of the normalized stamps on position polynomials.

    Returns coefficient images (n_terms, k, k).
    """
    norm = (stamps[keep] - pedestal[keep, None, None]) / flux[keep, None, None]
    weight = np.where(ignore[keep], 0.0,
                      flux[keep, None, None] ** 2 / np.clip(var[keep], 1e-12, None))
    terms = polynomial_terms(u[keep], v[keep], order).T  # (n, T)
    n, k = norm.shape[0], norm.shape[1]
    w = weight.reshape(n, -1)  # (n, P)
    # Both as matrix products over the stars (einsum's loops took 40x as long).
    n_terms = terms.shape[1]
    outer = (terms[:, :, None] * terms[:, None, :]).reshape(n, n_terms * n_terms)
    normal = (w.T @ outer).reshape(-1, n_terms, n_terms)  # (P, T, T)
    rhs = (w * norm.reshape(n, -1)).T @ terms  # (P, T)
    # A pixel no star constrains gets zero coefficients rather than a singular system.
    ridge = 1e-10 * max(float(normal.trace(axis1=1, axis2=2).max()), 1e-30)
    normal += ridge * np.eye(terms.shape[1])[None]
    coeffs = np.linalg.solve(normal, rhs[..., None])[..., 0]  # (P, T)
    return coeffs.T.reshape(-1, k, k)
