"""Per-stage wall time, CPU time and peak memory, and the wall time per visit-detector.

Input: ``{stage: {"wall": seconds, "cpu": seconds, "peak_rss": bytes}}`` (numbers in those
units or astropy Quantities). A stage named ``total`` gives the per-detector numbers; without it
they come from the sum over stages.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from apqa.errors import InputError
from apqa.metrics.records import column_in
from apqa.metrics.registry import Measurement

FIELDS = {"wall": "apqa.runtime.wall", "cpu": "apqa.runtime.cpu",
          "peak_rss": "apqa.runtime.peakRss"}


def runtime_metrics(runtime: Mapping[str, Mapping[str, object]], tags: dict[str, str],
                    n_exposures: int | None = None) -> list[Measurement]:
    """Measurements of every stage (tag ``stage``) and the per-detector totals."""
    if not isinstance(runtime, Mapping):
        raise InputError(f"runtime: expected {{stage: {{wall, cpu, peak_rss}}}}, got {runtime!r}")
    rows = []
    for stage, numbers in runtime.items():
        if not isinstance(numbers, Mapping) or set(numbers) - set(FIELDS):
            raise InputError(f"runtime[{stage!r}]: expected a mapping with keys from "
                             f"{sorted(FIELDS)}, got {numbers!r}")
        rows.append({"stage": str(stage), **numbers})
    frame = pd.DataFrame(rows)
    out: list[Measurement] = []
    totals: dict[str, float] = {}
    for field, metric in FIELDS.items():
        if field not in frame:
            continue
        values = column_in(frame[frame[field].notna()], field, metric, "runtime")
        stages = frame.loc[frame[field].notna(), "stage"]
        for stage, value in zip(stages, values, strict=True):
            out.append(Measurement(metric, value, None, None, {**tags, "stage": stage}))
        by_stage = dict(zip(stages, values, strict=True))
        totals[field] = by_stage.get("total", sum(by_stage.values()))
    if n_exposures:
        if "wall" in totals:
            out.append(Measurement("apqa.runtime.wallPerDetector", totals["wall"] / n_exposures,
                                   None, None, tags))
        if "cpu" in totals:
            out.append(Measurement("apqa.runtime.cpuPerDetector", totals["cpu"] / n_exposures,
                                   None, None, tags))
    return out
