"""Pairs of points closer than a radius, by a sweep over the points sorted in x.

What ``scipy.spatial.cKDTree.query_pairs`` gives, for the catalogs of a few thousand sources
that isolation tests see. scipy.spatial costs 90 ms to import (it brings scipy.linalg and
scipy.sparse), which every ``apqa diff`` would pay before its first pixel; the sweep needs
only numpy and takes about 10 ms for 8,000 sources on a 4096x4096 image (the tree 3 ms).
"""

from __future__ import annotations

import numpy as np

#: Candidate pairs examined at once: bounds the temporaries in dense fields (about 40 bytes
#: per candidate).
CHUNK_PAIRS = 1 << 20


def close_pairs(x: np.ndarray, y: np.ndarray, radius: float,
                chunk: int = CHUNK_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of the points at most ``radius`` apart.

    Parameters
    ----------
    x, y
        Coordinates of the points (same length). Points with a NaN coordinate pair with none.
    radius
        Largest separation of a pair (same units as the coordinates).
    chunk
        Candidate pairs (points within ``radius`` in x) examined at once.

    Returns
    -------
    i, j
        Arrays of indices into ``x``, in no particular order.

    Examples
    --------
    >>> i, j = close_pairs(np.array([0.0, 5.0, 1.0]), np.array([0.0, 0.0, 0.5]), 2.0)
    >>> sorted(zip(i.tolist(), j.tolist()))
    [(0, 2)]
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"close_pairs: x and y must be 1-d of one length, got {x.shape} "
                         f"and {y.shape}")
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    n = xs.size
    # The partners of point k (in x order) to its right are k + 1 .. stop[k] - 1.
    stop = np.searchsorted(xs, xs + radius, side="right")
    counts = np.maximum(stop - np.arange(n) - 1, 0)
    done = np.cumsum(counts)  # candidates up to and including each point
    found_i, found_j = [], []
    start = 0
    while start < n:
        before = int(done[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(done, before + chunk, side="right")))
        c = counts[start:end]
        first = np.repeat(np.arange(start, end), c)
        second = first + 1 + np.arange(first.size) - np.repeat(np.cumsum(c) - c, c)
        dx = xs[second] - xs[first]
        dy = ys[second] - ys[first]
        close = dx * dx + dy * dy <= radius * radius
        a, b = order[first[close]], order[second[close]]
        found_i.append(np.minimum(a, b))
        found_j.append(np.maximum(a, b))
        start = end
    if not found_i:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    return np.concatenate(found_i), np.concatenate(found_j)
