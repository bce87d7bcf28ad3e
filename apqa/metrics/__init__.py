"""apqa metrics: the registry, one module per metric family, and :func:`compute_metrics`.

Examples
--------
>>> from apqa.metrics import Measurement, compute_metrics, METRICS
>>> "apqa.completeness.snr50" in METRICS
True
"""

from apqa.metrics.registry import METRICS, Measurement, MetricDef, get_metric

__all__ = ["METRICS", "Measurement", "MetricDef", "compute_metrics", "get_metric"]


def __getattr__(name: str):
    # The metric families pull in scipy.stats and friends: imported on first use only, so that
    # reading a store or gating a run starts fast.
    if name == "compute_metrics":
        from apqa.metrics.compute import compute_metrics

        return compute_metrics
    raise AttributeError(f"module 'apqa.metrics' has no attribute {name!r}")
