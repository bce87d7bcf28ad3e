"""Gaussian-windowed second moments of sources, with the window divided out."""

from __future__ import annotations

import numpy as np

from apqa.pipeline.pixels import boxes


def windowed_moments(image: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Second moments (ixx, iyy, ixy; pixels^2) with a Gaussian window, window divided out.

    For a Gaussian source of covariance C seen through a window W, the weighted moments are
    (C^-1 + W^-1)^-1, so C = (M^-1 - W^-1)^-1. Non-positive results become NaN.
    """
    half = max(3, int(np.ceil(3 * sigma)))
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    return stamp_moments(boxes(image, ix, iy, half), x - ix, y - iy, sigma)


def stamp_moments(stamps: np.ndarray, x_offset: np.ndarray, y_offset: np.ndarray, sigma: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`windowed_moments` of odd-sized stamps (N, k, k) whose sources sit at
    (``x_offset``, ``y_offset``) from each stamp's central pixel."""
    half = stamps.shape[1] // 2
    off = np.arange(-half, half + 1)
    dx = -np.asarray(x_offset)[:, None, None] + off[None, None, :]
    dy = -np.asarray(y_offset)[:, None, None] + off[None, :, None]
    w = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * stamps
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
    ixx, iyy, ixy = (np.where(bad, np.nan, m) for m in (ixx, iyy, ixy))
    return ixx, iyy, ixy
