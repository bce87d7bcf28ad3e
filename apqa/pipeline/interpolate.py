"""Filling masked pixels (bad columns, saturated cores, cosmic rays) from their neighbours."""

from __future__ import annotations

import numpy as np

from apqa.pipeline.pixels import boxes


def interpolate_masked(image: np.ndarray, masked: np.ndarray, sigma: float = 1.5,
                       max_half: int = 64, targets: np.ndarray | None = None) -> np.ndarray:
    """Replace ``masked`` pixels by a Gaussian-weighted mean of the unmasked pixels around them.

    Only masked pixels are visited: each gathers a window of its neighbours (half-size ~2 sigma)
    and pixels whose window holds no good pixel try again with a window twice as large, up to
    ``max_half``. ``targets`` (a subset of ``masked``) limits the filling to those pixels, e.g.
    cosmic rays but not a large region without data. Returns a new float32 array; other pixels
    are unchanged.
    """
    out = image.astype(np.float32, copy=True)
    ys, xs = np.nonzero(masked if targets is None else targets & masked)
    half = max(1, int(np.ceil(2 * sigma)))
    while ys.size and half <= max_half:
        s = sigma * half / max(1, int(np.ceil(2 * sigma)))
        off = np.arange(-half, half + 1)
        weight = np.exp(-(off[:, None] ** 2 + off[None, :] ** 2) / (2 * s * s))
        done = np.zeros(ys.size, bool)
        # Chunks bound memory when a large hole needs large windows.
        step = max(1, 2_000_000 // weight.size)
        for start in range(0, ys.size, step):
            sl = slice(start, start + step)
            w = np.where(boxes(masked, xs[sl], ys[sl], half), 0.0, weight[None])
            total = w.sum(axis=(1, 2))
            ok = total > 1e-3 * weight.sum()
            values = (w * boxes(image, xs[sl], ys[sl], half)).sum(axis=(1, 2))
            idx = np.nonzero(ok)[0]
            out[ys[sl][idx], xs[sl][idx]] = values[idx] / total[idx]
            done[start + idx] = True
        ys, xs = ys[~done], xs[~done]
        half *= 2
    out[ys, xs] = 0.0  # nothing usable nearby: a hole larger than the widest window
    return out
