"""The CI gate: absolute thresholds and a statistical regression test against a baseline run.

Regression test: each measurement of the run is paired with the baseline's measurement of the
same metric and tags (both converted to the metric's unit). The change in the metric's bad
direction, ``d`` (see :meth:`MetricDef.worsening`), is compared with its noise
``sigma = sqrt(u_run^2 + u_base^2)`` from the two runs' uncertainties; a pair without
uncertainties uses ``sqrt(2)`` times the run-to-run scatter (robust std) of that value over the
baseline branch's recent history (at least :data:`MIN_HISTORY` runs). A pair regresses when
``d / sigma`` exceeds the normal quantile ``z(1 - alpha / m)``, where ``m`` is the number of
pairs tested: the chance that a gate fails on noise alone is at most ``alpha`` (Bonferroni), so
gates do not flake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd

from apqa.ci.thresholds import Threshold
from apqa.errors import InputError
from apqa.metrics.registry import METRICS, convert
from apqa.metrics.stats import robust_std
from apqa.store.store import MetricStore, RunInfo

LATEST_MAIN = "latest-main"
MAIN_BRANCH = "main"
MIN_HISTORY = 5
HISTORY_RUNS = 20


@dataclass(frozen=True)
class Check:
    """One gate decision."""

    kind: str  # "run", "threshold" or "regression"
    metric: str
    tags: dict
    passed: bool
    value: float | None
    unit: str
    expected: str
    detail: str = ""

    @property
    def tag_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.tags.items()))

    @property
    def name(self) -> str:
        tags = f" [{self.tag_text}]" if self.tags else ""
        return f"{self.metric}{tags} {self.expected}"


@dataclass
class GateReport:
    """Everything ``apqa gate`` decided about a run."""

    run: RunInfo
    baseline: RunInfo | None
    checks: list[Check] = field(default_factory=list)
    regression_tested: int = 0
    regression_untested: int = 0
    improved: int = 0
    z_limit: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failures


def _key(metric: str, tags: dict) -> tuple:
    return (metric, tuple(sorted(tags.items())))


def in_metric_unit(frame: pd.DataFrame) -> pd.DataFrame:
    """Values and uncertainties converted to each metric's declared unit, with a join key."""
    factors = [convert(1.0, u, m) for m, u in zip(frame["metric"], frame["unit"], strict=True)]
    out = frame.assign(value=frame["value"] * factors,
                       uncertainty=frame["uncertainty"] * factors)
    out["key"] = [_key(m, t) for m, t in zip(out["metric"], out["tags"], strict=True)]
    return out


def threshold_checks(frame: pd.DataFrame, thresholds: Sequence[Threshold]) -> list[Check]:
    """One check per (threshold, selected measurement), or a failing one when none matches."""
    checks = []
    by_metric = {m: g for m, g in frame.groupby("metric")} if len(frame) else {}
    for t in thresholds:
        rows = by_metric.get(t.metric)
        selected = [] if rows is None else [
            r for r in rows.itertuples() if t.selects(r.tags)]
        if not selected:
            checks.append(Check("threshold", t.metric, dict(t.tags), False, None, t.unit, t.text,
                                "no measurement in this run"))
            continue
        for r in selected:
            value = convert(r.value, r.unit, t.metric) / convert(1.0, t.unit, t.metric)
            ok = t.holds(r.value, r.unit)
            checks.append(Check("threshold", t.metric, dict(r.tags), ok, value, t.unit, t.text,
                                "" if ok else ("value is NaN" if math.isnan(value) else
                                               "threshold violated")))
    return checks


def _history_sigma(store: MetricStore, run: RunInfo, baseline: RunInfo) -> dict[tuple, float]:
    """Run-to-run robust scatter of every value over the baseline branch's recent runs."""
    history = store.history(dataset=run.dataset, branch=baseline.git_branch, exclude=run.id,
                            limit=HISTORY_RUNS)
    if history.empty:
        return {}
    history = in_metric_unit(history)
    out = {}
    for key, group in history.groupby("key", sort=False):
        values = group["value"].to_numpy(float)
        values = values[np.isfinite(values)]
        if len(values) >= MIN_HISTORY:
            out[key] = robust_std(values)
    return out


def regression_checks(report: GateReport, store: MetricStore, current: pd.DataFrame,
                      alpha: float) -> list[Check]:
    """Regression checks of ``current`` against ``report.baseline`` (see module docstring)."""
    base = in_metric_unit(store.measurement_frame([report.baseline.id]))
    cur = in_metric_unit(current)
    pairs = cur.merge(base[["key", "value", "uncertainty"]], on="key", suffixes=("", "_base"))
    pairs = pairs[[METRICS[m].better != "none" for m in pairs["metric"]]]
    pairs = pairs[np.isfinite(pairs["value"]) & np.isfinite(pairs["value_base"])]
    sigma = np.sqrt(pairs["uncertainty"].to_numpy(float) ** 2
                    + pairs["uncertainty_base"].to_numpy(float) ** 2)
    missing = ~(sigma > 0)
    if missing.any():
        scatter = _history_sigma(store, report.run, report.baseline)
        sigma[missing] = [math.sqrt(2) * scatter.get(k, math.nan)
                          for k in pairs["key"].to_numpy()[missing]]
    testable = sigma > 0
    report.regression_untested = int((~testable).sum())
    pairs, sigma = pairs[testable], sigma[testable]
    report.regression_tested = len(pairs)
    if not len(pairs):
        return []
    report.z_limit = -NormalDist().inv_cdf(alpha / len(pairs))  # one-sided quantile
    checks = []
    for row, s in zip(pairs.itertuples(), sigma, strict=True):
        z = METRICS[row.metric].worsening(row.value, row.value_base) / s
        report.improved += int(z < -report.z_limit)
        if z > report.z_limit:
            unit = METRICS[row.metric].unit_str
            checks.append(Check(
                "regression", row.metric, dict(row.tags), False, row.value, unit,
                f"not worse than run {report.baseline.id}",
                f"{row.value:.6g} vs {row.value_base:.6g} (noise {s:.3g}): {z:.1f} sigma worse, "
                f"limit {report.z_limit:.2f}"))
    return checks


def resolve_baseline(store: MetricStore, run: RunInfo, baseline: str | None) -> RunInfo | None:
    """The baseline run: an id, ``latest`` or ``latest-main`` (the newest succeeded run of the
    same dataset on branch main, other than ``run``); None when ``latest-main`` has none."""
    if baseline is None:
        return None
    if baseline == LATEST_MAIN:
        return store.latest_run(dataset=run.dataset, branch=MAIN_BRANCH, exclude=run.id)
    found = store.resolve_run(baseline)
    if found.id == run.id:
        raise InputError(f"--baseline {baseline}: is the run being gated ({run.id})")
    return found


def evaluate_gate(store: MetricStore, run: str | int, thresholds: Sequence[Threshold],
                  baseline: str | None = None, *, alpha: float = 0.01) -> GateReport:
    """Decide whether ``run`` passes: thresholds, then regression against ``baseline``.

    Parameters
    ----------
    store
        The metric store.
    run
        Run id or ``latest``.
    thresholds
        Absolute thresholds (:func:`apqa.ci.thresholds.load_thresholds`).
    baseline
        Run id, ``latest`` or ``latest-main``; None skips the regression test.
    alpha
        Largest chance that the regression test fails a run on noise alone.

    Returns
    -------
    GateReport
    """
    if not 0 < alpha < 1:
        raise InputError(f"--alpha must be in (0, 1), got {alpha}")
    info = store.resolve_run(run)
    report = GateReport(info, resolve_baseline(store, info, baseline))
    if info.status != "succeeded":
        report.checks.append(Check("run", "run status", {}, False, None, "", "succeeded",
                                   f"run {info.id} is {info.status}"))
        return report
    current = store.measurement_frame([info.id])
    report.checks += threshold_checks(current, thresholds)
    if baseline is not None and report.baseline is None:
        report.notes.append(f"no succeeded {MAIN_BRANCH} run of {info.dataset}: regression "
                            "test skipped")
    elif report.baseline is not None:
        report.checks += regression_checks(report, store, current, alpha)
    return report
