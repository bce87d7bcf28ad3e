"""Per-exposure input records (plain dicts or a DataFrame) and their run-level aggregates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import astropy.units as u
import numpy as np
import pandas as pd

from apqa.errors import InputError
from apqa.metrics.registry import Measurement, get_metric
from apqa.metrics.stats import MEDIAN_SE, robust_std

Records = pd.DataFrame | Iterable[Mapping[str, object]]


def to_frame(records: Records, source: str, required: tuple[str, ...] = ("visit",)
             ) -> pd.DataFrame:
    """A DataFrame of records; a missing required column names ``source`` and the column."""
    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    for column in required:
        if column not in frame.columns:
            raise InputError(f"{source}: every record needs {column!r}")
    return frame


def column_in(frame: pd.DataFrame, column: str, metric: str, source: str) -> np.ndarray:
    """Values of ``column`` in the metric's unit: Quantities are converted, numbers are taken
    to be in the metric's unit already."""
    unit = get_metric(metric).unit
    values = []
    for value in frame[column]:
        if isinstance(value, u.Quantity):
            try:
                value = value.to_value(unit)
            except u.UnitConversionError:
                raise InputError(f"{source}: {column!r} in {value.unit} does not convert to "
                                 f"{unit}") from None
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise InputError(f"{source}: {column!r} must be a number, got {value!r}") from None
    return np.asarray(values, float)


def exposure_tags(frame: pd.DataFrame, tags: dict[str, str]) -> tuple[list[dict], dict]:
    """Tags of each record (visit, and detector when present) and of the run aggregate."""
    keys = [k for k in ("visit", "detector") if k in frame.columns]
    per_row = [{**tags, **{k: str(row[k]) for k in keys}}
               for row in frame[keys].to_dict("records")]
    return per_row, {**tags, **{k: "all" for k in keys}}


def per_exposure(frame: pd.DataFrame, column: str, metric: str, tags: dict[str, str],
                 source: str, aggregate: str = "median") -> list[Measurement]:
    """One measurement per record plus the run aggregate (median with its standard error, or
    sum); records with a missing value are left out."""
    if column not in frame.columns:
        return []
    values = column_in(frame, column, metric, source)
    row_tags, run_tags = exposure_tags(frame, tags)
    ok = np.isfinite(values)
    out = [Measurement(metric, v, None, None, t)
           for v, t, good in zip(values, row_tags, ok, strict=True) if good]
    if not ok.any():
        return out
    good = values[ok]
    if aggregate == "sum":
        out.append(Measurement(metric, good.sum(), None, None, run_tags))
    else:
        err = MEDIAN_SE * robust_std(good) / np.sqrt(len(good)) if len(good) > 1 else None
        out.append(Measurement(metric, float(np.median(good)), None, err, run_tags))
    return out
