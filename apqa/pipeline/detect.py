"""Source detection with a matched filter, and windowed measurements of what was found.

The image is correlated with a Gaussian approximating the PSF and divided by the correlated
noise, so the threshold is a true S/N whatever the per-pixel variance; sep then finds and
deblends footprints on that S/N map.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import sep
from scipy.ndimage import gaussian_filter

from apqa.errors import StageError

SIGMA_TO_FWHM = 2.3548


def matched_filter_snr(image: np.ndarray, variance: np.ndarray, masked: np.ndarray,
                       fwhm: float) -> np.ndarray:
    """S/N of a point source at each pixel, for a Gaussian PSF of this FWHM (pixels).

    With G the normalized Gaussian: ``snr = (G * D) / sqrt(G^2 * V)``, and
    ``G^2 = N(sigma / sqrt 2) / (4 pi sigma^2)``.
    """
    sigma = max(fwhm, 1.0) / SIGMA_TO_FWHM
    data = np.where(masked, 0.0, image).astype(np.float32)
    var = np.where(masked | ~np.isfinite(variance), 0.0, variance).astype(np.float32)
    num = gaussian_filter(data, sigma, mode="constant", truncate=3.0)
    den = gaussian_filter(var, sigma / np.sqrt(2), mode="constant", truncate=3.0)
    den /= np.float32(4 * np.pi * sigma**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), 0.0)
    return snr.astype(np.float32)


def windowed_moments(image: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Second moments (ixx, iyy, ixy; pixels^2) with a Gaussian window, window divided out.

    For a Gaussian source of covariance C seen through a window W, the weighted moments are
    (C^-1 + W^-1)^-1, so C = (M^-1 - W^-1)^-1. Non-positive results become NaN.
    """
    half = max(3, int(np.ceil(3 * sigma)))
    off = np.arange(-half, half + 1)
    height, width = image.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    wy = np.clip(iy[:, None, None] + off[None, :, None], 0, height - 1)
    wx = np.clip(ix[:, None, None] + off[None, None, :], 0, width - 1)
    dx = (ix - x)[:, None, None] + off[None, None, :]
    dy = (iy - y)[:, None, None] + off[None, :, None]
    w = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * image[wy, wx]
    total = w.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mxx = (w * dx * dx).sum(axis=(1, 2)) / total
        myy = (w * dy * dy).sum(axis=(1, 2)) / total
        mxy = (w * dx * dy).sum(axis=(1, 2)) / total
        # Invert M, subtract the window's inverse, invert back.
        det = mxx * myy - mxy**2
        a, b, c = myy / det - 1 / sigma**2, -mxy / det, mxx / det - 1 / sigma**2
        det2 = a * c - b * b
        ixx, iyy, ixy = c / det2, a / det2, -b / det2
    bad = ~(np.isfinite(ixx) & (ixx > 0) & (iyy > 0) & (det2 > 0) & (total > 0))
    ixx[bad], iyy[bad], ixy[bad] = np.nan, np.nan, np.nan
    return ixx, iyy, ixy


def detect_sources(image: np.ndarray, variance: np.ndarray, masked: np.ndarray, fwhm: float,
                   threshold: float = 5.0, min_area: int = 5, deblend_contrast: float = 0.005,
                   ) -> tuple[pd.DataFrame, np.ndarray]:
    """Positive sources above ``threshold`` S/N (matched filter), deblended.

    Returns a catalog (x, y, peak_snr, npix, sep_flag, blended) and the segmentation map.
    """
    snr = matched_filter_snr(image, variance, masked, fwhm)
    sep.set_extract_pixstack(20_000_000)
    sep.set_sub_object_limit(4096)
    objects, segmap = sep.extract(snr, threshold, mask=masked, minarea=min_area,
                                  filter_kernel=None, deblend_cont=deblend_contrast,
                                  segmentation_map=True)
    if len(objects) == 0:
        raise StageError(f"no sources detected above S/N {threshold:g}")
    catalog = pd.DataFrame({
        "x": objects["x"], "y": objects["y"], "peak_snr": objects["peak"],
        "npix": objects["npix"], "sep_flag": objects["flag"],
        "blended": (objects["flag"] & sep.OBJ_MERGED) != 0,
    })
    return catalog, segmap
