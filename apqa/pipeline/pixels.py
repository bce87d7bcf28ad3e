"""Pixel-grid helpers shared by the measurement stages: block sums, their inverse, and
per-position lookups of flag boxes (none of them touches more of the image than it must)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d


def bin_sum(array: np.ndarray, factor: int) -> np.ndarray:
    """Sums over ``factor`` x ``factor`` blocks (the ragged edge dropped); strided adds are
    several times faster than a reshaped ``sum``. Booleans are counted (uint8 is enough for
    blocks of up to 15 x 15).

    Examples
    --------
    >>> bin_sum(np.ones((4, 6)), 2)
    array([[4., 4., 4.],
           [4., 4., 4.]])
    """
    if array.dtype == bool:
        array = array.view(np.uint8)
    height, width = (s // factor * factor for s in array.shape)
    rows = array[:height, 0:width:factor].copy()
    for i in range(1, factor):
        rows += array[:height, i:width:factor]
    out = rows[0::factor].copy()
    for i in range(1, factor):
        out += rows[i::factor]
    return out


def upsample(binned: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Each binned pixel's value over the full pixels it covers (the ragged edge stays 0)."""
    out = np.zeros(shape, binned.dtype)
    height, width = binned.shape
    view = out[:height * factor, :width * factor].reshape(height, factor, width, factor)
    view[:] = binned[:, None, :, None]
    return out


def any_in_box(flags: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """For each position: is any flag set within the (2 half + 1)^2 box around its pixel?

    Examples
    --------
    >>> flags = np.zeros((10, 10), bool); flags[5, 5] = True
    >>> any_in_box(flags, np.array([3.0, 8.0]), np.array([5.0, 1.0]), 2)
    array([ True, False])
    """
    height, width = flags.shape
    off = np.arange(-half, half + 1)
    ix = np.rint(np.asarray(x, np.float64)).astype(int)
    iy = np.rint(np.asarray(y, np.float64)).astype(int)
    wy = np.clip(iy[:, None, None] + off[None, :, None], 0, height - 1)
    wx = np.clip(ix[:, None, None] + off[None, None, :], 0, width - 1)
    return flags[wy, wx].any(axis=(1, 2))


def grow_square(flags: np.ndarray, reach: int) -> np.ndarray:
    """``flags`` grown by ``reach`` pixels in a square (two separable max filters)."""
    grown = maximum_filter1d(flags.view(np.uint8), 2 * reach + 1, axis=0)
    return maximum_filter1d(grown, 2 * reach + 1, axis=1).view(bool)
