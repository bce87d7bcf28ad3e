"""Sky background of an image: sep's mesh statistics on binned pixels, subtracted in place."""

from __future__ import annotations

import numpy as np
import sep

from apqa.datamodel.blocks import row_blocks
from apqa.pipeline.pixels import bin_sum


def subtract_binned_background(image: np.ndarray, masked: np.ndarray, mesh: int = 128,
                               filter_size: int = 3, factor: int = 4) -> float:
    """Subtract the sky in place: sep's mesh background (``mesh`` pixels, median filter over
    ``filter_size`` meshes) measured on ``factor`` x ``factor``-binned pixels, interpolated
    back bilinearly a block of rows at a time.

    The mesh statistics see the same pixels as at full resolution (a mesh of 128 pixels is
    one of 32 binned ones), sixteen times fewer of them, and the sky is smooth on the scale of
    a bin. sep holds Python's GIL while it works (sep-developers/sep#172): on a 4096x4096
    image its full-resolution background took 0.19 s during which the other image's thread,
    in ``apqa diff``, could not run; binned, 0.01 s. Bins holding a masked pixel are left out
    (masked pixels may be NaN: they stay NaN). Returns the global sky level; the noise per
    pixel left is :func:`clipped_rms`.

    Examples
    --------
    >>> image = np.random.default_rng(0).normal(50.0, 2.0, (256, 256)).astype(np.float32)
    >>> level = subtract_binned_background(image, np.zeros(image.shape, bool))
    >>> round(level), round(clipped_rms(image, np.zeros(image.shape, bool)))
    (50, 2)
    >>> abs(float(image.mean())) < 0.1
    True
    """
    binned = bin_sum(image, factor)
    size = max(1, mesh // factor)
    bkg = sep.Background(binned, mask=bin_sum(masked, factor) > 0, bw=size, bh=size,
                         fw=filter_size, fh=filter_size)
    # Per full-resolution pixel: a bin holds factor^2 pixels.
    sky = bkg.back(dtype=np.float32) / np.float32(factor * factor)

    def axis_weights(n: int, n_binned: int) -> tuple[np.ndarray, np.ndarray]:
        # Bin j is centred on pixel factor j + (factor - 1) / 2; beyond the outer centres the
        # sky is held constant.
        t = (np.arange(n) - (factor - 1) / 2) / factor
        lower = np.clip(np.floor(t).astype(int), 0, max(n_binned - 2, 0))
        frac = np.clip(t - lower, 0.0, 1.0).astype(np.float32)
        return lower, frac

    if min(sky.shape) < 2:
        image -= np.float32(sky.mean())
    else:
        lx, fx = axis_weights(image.shape[1], sky.shape[1])
        # Full-resolution columns, binned rows (``take`` gathers columns ten times faster
        # than a fancy index, and returns C order, whose rows the loop gathers fast).
        along_x = np.take(sky, lx, axis=1)
        along_x *= 1 - fx
        right = np.take(sky, lx + 1, axis=1)
        right *= fx
        along_x += right
        del right
        ly, fy = axis_weights(image.shape[0], sky.shape[0])
        for rows in row_blocks(image.shape[0]):
            wy = fy[rows, None]
            block = np.take(along_x, ly[rows], axis=0)
            block *= 1 - wy
            upper = np.take(along_x, ly[rows] + 1, axis=0)
            upper *= wy
            block += upper
            image[rows] -= block
    return float(bkg.globalback) / factor**2


def clipped_rms(image: np.ndarray, masked: np.ndarray, clip: float = 2.5,
                iterations: int = 5) -> float:
    """Noise per pixel: robust width (MAD) of the unmasked pixels, iteratively clipped at
    ``clip`` widths so that sources do not widen it.

    From the pixels themselves, since binned noise scales with the bin size only for
    uncorrelated pixels (resampled images are not); every 8th pixel each way is plenty. On a
    field whose pixels were 18% on stars, 5.06 for a true 5.0 (5.59 unclipped, 5.30 from sep).
    """
    step = 8 if min(image.shape) >= 256 else 1
    values = image[::step, ::step][~masked[::step, ::step]]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    keep = np.ones(values.size, bool)
    width = 0.0
    for _ in range(iterations):
        centre = float(np.median(values[keep]))
        width = 1.4826 * float(np.median(np.abs(values[keep] - centre)))
        if width == 0:
            break
        keep = np.abs(values - centre) < clip * width
    return width
