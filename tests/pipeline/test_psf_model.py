"""Helpers of the PSF-model fit (the fit itself is tested through characterize and prepare)."""

from __future__ import annotations

import numpy as np

from apqa.pipeline.psf_model import _row_medians


def test_row_medians_equal_numpy_medians_of_each_rows_selection():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = rng.integers(1, 30), rng.integers(1, 40)
        values = rng.normal(size=(n, m))
        valid = rng.random((n, m)) < rng.random()
        expected = [np.median(row[ok]) if ok.any() else 0.0
                    for row, ok in zip(values, valid, strict=True)]
        assert np.array_equal(_row_medians(values, valid), expected)
