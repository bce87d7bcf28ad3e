"""Forced photometry: PSF fluxes at fixed positions, aperture fluxes and aperture corrections."""

from __future__ import annotations

import numpy as np
import sep

from apqa.datamodel import Psf, psf_stamps

_CHUNK = 2048


def psf_flux(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, psf: Psf,
             x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
    """Linear PSF fit at fixed centroids (Rubin's PsfFlux).

    ``flux = sum(P D) / sum(P^2)``, ``err = sqrt(sum(P^2 V)) / sum(P^2)`` over usable pixels
    (``usable`` False for masked pixels), with P the PSF at the source's sub-pixel position.

    Returns
    -------
    flux, flux_err, chi2, ndata
        Arrays of the sources' length; chi2 is the sum of squared normalized residuals.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = x.size
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    chi2 = np.full(n, np.nan)
    ndata = np.zeros(n, np.int64)
    height, width = image.shape
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        stamps, ix, iy = psf_stamps(psf, x[sl], y[sl])
        half = stamps.shape[1] // 2
        off = np.arange(-half, half + 1)
        wy = iy[:, None, None] + off[None, :, None]
        wx = ix[:, None, None] + off[None, None, :]
        inside = (wy >= 0) & (wy < height) & (wx >= 0) & (wx < width)
        wy, wx = np.clip(wy, 0, height - 1), np.clip(wx, 0, width - 1)
        ok = inside & usable[wy, wx]
        p = np.where(ok, stamps, 0.0).astype(np.float64)
        d = image[wy, wx].astype(np.float64)
        v = variance[wy, wx].astype(np.float64)
        v = np.where(ok, v, 0.0)
        pp = (p * p).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (p * d).sum(axis=(1, 2)) / pp
            e = np.sqrt((p * p * v).sum(axis=(1, 2))) / pp
            r = np.where(ok & (v > 0), (d - f[:, None, None] * p) ** 2 / np.where(v > 0, v, 1),
                         0.0)
        flux[sl], err[sl] = f, e
        chi2[sl] = r.sum(axis=(1, 2))
        ndata[sl] = ok.sum(axis=(1, 2))
    return flux, err, chi2, ndata


def aperture_flux(image: np.ndarray, variance: np.ndarray, masked: np.ndarray, x: np.ndarray,
                  y: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circular aperture flux, error and sep flags (exact pixel overlap)."""
    flux, err, flag = sep.sum_circle(
        np.ascontiguousarray(image, np.float32), np.asarray(x, float), np.asarray(y, float),
        radius, var=np.ascontiguousarray(variance, np.float32), mask=masked, subpix=0)
    return flux, err, flag


def aperture_correction(psf_flux_values: np.ndarray, ap_flux_values: np.ndarray) -> tuple[
        float, float]:
    """Median ratio of aperture to PSF flux for PSF stars, and its error."""
    ratio = ap_flux_values / psf_flux_values
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return 1.0, 0.0
    median = float(np.median(ratio))
    mad = 1.4826 * float(np.median(np.abs(ratio - median)))
    return median, mad / np.sqrt(ratio.size)
