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
    (``usable`` False for masked pixels; a boolean image, or anything that gives the values at
    ``usable[rows, cols]``), with P the PSF at the source's sub-pixel position.

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
                  y: np.ndarray, radius: float, annulus: tuple[float, float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Circular aperture flux, error and sep flags (exact pixel overlap).

    With ``annulus`` (inner, outer radius), the mean of the annulus is subtracted as a local
    background: in crowded fields unresolved stars raise every aperture alike.
    """
    var = np.where(np.isfinite(variance), variance, 0).astype(np.float32)
    flux, err, flag = sep.sum_circle(
        np.ascontiguousarray(image, np.float32), np.asarray(x, float), np.asarray(y, float),
        radius, var=var, mask=masked, subpix=0, bkgann=annulus)
    return flux, err, flag


def aperture_correction(psf_flux_values: np.ndarray, ap_flux_values: np.ndarray,
                        ap_flux_err: np.ndarray, clip: float = 3.0) -> tuple[float, float]:
    """Aperture-to-PSF flux ratio of PSF stars: inverse-variance weighted, sigma-clipped mean.

    The large aperture's noise dominates each ratio, so bright stars get the weight they
    deserve (a plain median of faint and bright stars alike is several times noisier).
    Returns (correction, error).
    """
    ratio = np.asarray(ap_flux_values) / np.asarray(psf_flux_values)
    sigma = np.abs(ratio) * np.asarray(ap_flux_err) / np.abs(np.asarray(ap_flux_values))
    ok = np.isfinite(ratio) & np.isfinite(sigma) & (sigma > 0)
    if not ok.any():
        return 1.0, 0.0
    used = ok.copy()
    mean = float(np.median(ratio[ok]))
    for _ in range(10):
        w = 1.0 / sigma[used] ** 2
        mean = float(np.sum(w * ratio[used]) / np.sum(w))
        new = ok & (np.abs(ratio - mean) < clip * sigma)
        if new.sum() < 3 or np.array_equal(new, used):
            break
        used = new
    w = 1.0 / sigma[used] ** 2
    chi2 = float(np.sum(w * (ratio[used] - mean) ** 2) / max(used.sum() - 1, 1))
    return mean, float(np.sqrt(max(chi2, 1.0) / np.sum(w)))


def psf_fit_centroid(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, psf: Psf,
                     x: np.ndarray, y: np.ndarray, iterations: int = 2, max_step: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood PSF centroids by Gauss-Newton steps from (x, y).

    Each step fits ``D = f P + a dP/dx + b dP/dy`` (weights 1/V) at the current position and
    moves by ``(-a / f, -b / f)``, at most ``max_step`` pixels; a source whose fit has no
    positive flux keeps its position. Works for negative sources when ``image`` is negated.
    """
    x = np.asarray(x, np.float64).copy()
    y = np.asarray(y, np.float64).copy()
    height, width = image.shape
    for _ in range(iterations):
        for start in range(0, x.size, _CHUNK):
            sl = slice(start, start + _CHUNK)
            stamps, ix, iy = psf_stamps(psf, x[sl], y[sl])
            half = stamps.shape[1] // 2
            off = np.arange(-half, half + 1)
            wy = iy[:, None, None] + off[None, :, None]
            wx = ix[:, None, None] + off[None, None, :]
            inside = (wy >= 0) & (wy < height) & (wx >= 0) & (wx < width)
            wy, wx = np.clip(wy, 0, height - 1), np.clip(wx, 0, width - 1)
            v = variance[wy, wx].astype(np.float64)
            ok = inside & usable[wy, wx] & np.isfinite(v) & (v > 0)
            w = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
            d = np.where(ok, image[wy, wx], 0.0).astype(np.float64)
            p = stamps.astype(np.float64)
            gy, gx = np.gradient(p, axis=(1, 2))
            basis = np.stack([p, gx, gy], axis=1)  # (n, 3, k, k)
            normal = np.einsum("nikl,njkl,nkl->nij", basis, basis, w)
            rhs = np.einsum("nikl,nkl,nkl->ni", basis, d, w)
            good = np.linalg.det(normal) > 0
            coef = np.zeros_like(rhs)
            coef[good] = np.linalg.solve(normal[good], rhs[good][..., None])[..., 0]
            f = coef[:, 0]
            move = good & (f > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                dx = np.clip(-coef[:, 1] / f, -max_step, max_step)
                dy = np.clip(-coef[:, 2] / f, -max_step, max_step)
            x[sl] = np.where(move, x[sl] + np.nan_to_num(dx), x[sl])
            y[sl] = np.where(move, y[sl] + np.nan_to_num(dy), y[sl])
    return x, y


def fit_window(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, cx: float,
               cy: float, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The box of half-size ``half`` around (cx, cy), clipped to the image, for model fits.

    Returns ``(data, sqrt_weight, ok, x0, y0)``: float64 pixels, 1/sigma (0 where unusable),
    the usable-pixel map and the box's lower-left pixel.
    """
    ix, iy = round(cx), round(cy)
    height, width = image.shape
    y0, y1 = max(iy - half, 0), min(iy + half + 1, height)
    x0, x1 = max(ix - half, 0), min(ix + half + 1, width)
    data = image[y0:y1, x0:x1].astype(np.float64)
    var = variance[y0:y1, x0:x1].astype(np.float64)
    ok = usable[y0:y1, x0:x1] & np.isfinite(var) & (var > 0) & np.isfinite(data)
    sqrt_weight = np.where(ok, 1.0 / np.sqrt(np.where(ok, var, 1.0)), 0.0)
    return data, sqrt_weight, ok, x0, y0
