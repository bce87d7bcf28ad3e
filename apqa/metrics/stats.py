"""Small vectorized estimators shared by the metric families (intervals, robust scatter)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from apqa.metrics.registry import Measurement

MAD_TO_SIGMA = 1.482602218505602
# Asymptotic standard errors for Gaussian data: median 1.2533 sigma / sqrt(n); the normalized
# MAD 1.1664 sigma / sqrt(n) (its efficiency is 37%).
MEDIAN_SE = 1.2533141373155
MAD_SE = 1.1664


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial fraction k/n (z=1: 68.3%).

    Examples
    --------
    >>> lo, hi = wilson_interval(np.array([10]), np.array([10]))
    >>> round(float(lo[0]), 3), round(float(hi[0]), 3)
    (0.909, 1.0)
    """
    k = np.asarray(k, float)
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def fraction_with_error(k: int, n: int) -> tuple[float, float]:
    """(k/n, half-width of the 68% Wilson interval); NaN for n == 0."""
    if n == 0:
        return float("nan"), float("nan")
    lo, hi = wilson_interval(np.array([k]), np.array([n]))
    return k / n, float(hi[0] - lo[0]) / 2


def fraction_measurement(metric: str, k: int, n: int, tags: dict[str, str]) -> Measurement:
    """A fraction k/n as a measurement with the 68% Wilson half-width as uncertainty."""
    value, err = fraction_with_error(k, n)
    return Measurement(metric, value, None, err, tags)


def robust_std(values: np.ndarray) -> float:
    """1.4826 times the median absolute deviation (NaN for an empty array)."""
    if len(values) == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))


def median_and_scatter(values: np.ndarray) -> tuple[float, float, float, float]:
    """(median, its standard error, robust std, its standard error) of finite ``values``."""
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        nan = float("nan")
        return nan, nan, nan, nan
    med = float(np.median(values))
    sigma = robust_std(values)
    return med, MEDIAN_SE * sigma / np.sqrt(n), sigma, MAD_SE * sigma / np.sqrt(n)


def bin_labels(edges: tuple[float, ...]) -> list[str]:
    """'lo-hi' labels of consecutive edges ('10-inf' for an open last bin)."""
    def fmt(v: float) -> str:
        return "inf" if np.isinf(v) else f"{v:g}"
    return [f"{fmt(a)}-{fmt(b)}" for a, b in pairwise(edges)]
