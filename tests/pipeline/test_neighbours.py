"""close_pairs against scipy's k-d tree, which it replaces on the differencing path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from apqa.pipeline.neighbours import close_pairs


def _as_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    assert np.all(i < j)
    return set(zip(i.tolist(), j.tolist(), strict=True))


@pytest.mark.parametrize(("n", "size", "radius", "chunk"), [
    (8000, 4096.0, 14.0, 1 << 20),  # a 4096x4096 image's sources, isolation radius
    (8000, 4096.0, 14.0, 1000),     # the same in many chunks
    (3000, 200.0, 10.0, 777),       # dense: tens of thousands of pairs
    (50, 10.0, 3.0, 1),             # one candidate per chunk
])
def test_close_pairs_are_the_k_d_tree_pairs(n: int, size: float, radius: float,
                                            chunk: int) -> None:
    rng = np.random.default_rng(n + chunk)
    x, y = rng.uniform(0, size, n), rng.uniform(0, size, n)
    x[10:20] = x[:10]  # equal x: ties in the sort
    y[20] = y[21] = 5.0
    x[21] = x[20] + radius  # exactly at the radius: a pair, as for the tree
    expected = {tuple(p) for p in
                cKDTree(np.column_stack([x, y])).query_pairs(radius, output_type="ndarray")}
    found = _as_set(*close_pairs(x, y, radius, chunk))
    assert found == expected and len(found) > 0


def test_close_pairs_of_few_and_missing_points() -> None:
    assert _as_set(*close_pairs(np.zeros(0), np.zeros(0), 3.0)) == set()
    assert _as_set(*close_pairs(np.ones(1), np.ones(1), 3.0)) == set()
    x = np.array([0.0, np.nan, 1.0, np.nan])
    assert _as_set(*close_pairs(x, np.zeros(4), 2.0)) == {(0, 2)}  # NaN pairs with none


def test_close_pairs_rejects_mismatched_coordinates() -> None:
    with pytest.raises(ValueError, match="x and y must be 1-d of one length"):
        close_pairs(np.zeros(3), np.zeros(4), 1.0)
