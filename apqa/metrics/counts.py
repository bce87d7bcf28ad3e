"""ap_verify-style counts: association per visit, the APDB's DiaObjects and the alerts written.

Input (every key optional)::

    counts = {
        "per_visit": [  # one record per visit (or visit-detector); any subset of the counts
            {"visit": 410001, "detector": 1, "numNewDiaObjects": 12,
             "numUnassociatedDiaObjects": 3, "numUpdatedDiaObjects": 40,
             "numDiaSources": 52, "numSciSources": 2100},
        ],
        "dia_objects": dia_object_table,   # APDB DiaObject table (needs nDiaSources)
        "alerts": {"count": 52, "total_bytes": 1_300_000},
    }
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from apqa.errors import InputError
from apqa.metrics.records import exposure_tags, per_exposure, to_frame
from apqa.metrics.registry import Measurement

_SUMMED = {
    "numNewDiaObjects": "apqa.association.numNewDiaObjects",
    "numUnassociatedDiaObjects": "apqa.association.numUnassociatedDiaObjects",
    "numSciSources": "apqa.diffim.numSciSources",
}
_KEYS = {"per_visit", "dia_objects", "alerts"}


def _ratio(frame: pd.DataFrame, num: str, den: list[str], metric: str,
           tags: dict[str, str]) -> list[Measurement]:
    """num / sum(den) per record and for the run (from the summed counts)."""
    if num not in frame or not all(c in frame for c in den):
        return []
    top = frame[num].to_numpy(float)
    bottom = frame[den].to_numpy(float).sum(axis=1)
    row_tags, run_tags = exposure_tags(frame, tags)
    out = [Measurement(metric, a / b, None, None, t)
           for a, b, t in zip(top, bottom, row_tags, strict=True) if b > 0]
    if bottom.sum() > 0:
        out.append(Measurement(metric, top.sum() / bottom.sum(), None, None, run_tags))
    return out


def count_metrics(counts: Mapping[str, object], tags: dict[str, str]) -> list[Measurement]:
    """Measurements from the ``counts`` mapping described in this module's docstring."""
    unknown = set(counts) - _KEYS
    if unknown:
        raise InputError(f"counts: unknown keys {sorted(unknown)}; expected {sorted(_KEYS)}")
    out: list[Measurement] = []
    if counts.get("per_visit") is not None:
        frame = to_frame(counts["per_visit"], "counts.per_visit")
        for column, metric in _SUMMED.items():
            out += per_exposure(frame, column, metric, tags, "counts.per_visit", "sum")
        out += _ratio(frame, "numUpdatedDiaObjects",
                      ["numUpdatedDiaObjects", "numUnassociatedDiaObjects"],
                      "apqa.association.fracUpdatedDiaObjects", tags)
        out += _ratio(frame, "numDiaSources", ["numSciSources"],
                      "apqa.diffim.fracDiaSourcesToSciSources", tags)
    objects = counts.get("dia_objects")
    if objects is not None:
        if "nDiaSources" not in objects:
            raise InputError("counts.dia_objects: column 'nDiaSources' is missing")
        single = int((objects["nDiaSources"].to_numpy() == 1).sum())
        out.append(Measurement("apqa.association.totalUnassociatedDiaObjects", single, None,
                               None, tags))
    alerts = counts.get("alerts")
    if alerts is not None:
        try:
            n, total = int(alerts["count"]), float(alerts["total_bytes"])
        except (KeyError, TypeError, ValueError):
            raise InputError("counts.alerts: expected {'count': int, 'total_bytes': int}, "
                             f"got {alerts!r}") from None
        out.append(Measurement("apqa.alerts.count", n, None, None, tags))
        out.append(Measurement("apqa.alerts.totalSize", total, None, None, tags))
        if n:
            out.append(Measurement("apqa.alerts.meanSize", total / n, None, None, tags))
    return [m for m in out if np.isfinite(m.value)]
