"""Compute every metric a run's products allow: the one entry point the runner calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from apqa.errors import InputError
from apqa.metrics.artifacts import artifact_metrics
from apqa.metrics.calibration import calibration_metrics, diffim_metrics
from apqa.metrics.completeness import completeness_metrics
from apqa.metrics.counts import count_metrics
from apqa.metrics.photometry import photometry_metrics
from apqa.metrics.records import Records
from apqa.metrics.registry import Measurement
from apqa.metrics.runtime import runtime_metrics

MATCHED_COLUMNS = ("injection_id", "fake_class", "band", "truth_ra", "truth_dec", "truth_mag",
                   "truth_flux", "truth_flux_err", "forced_flux", "truth_snr", "host_sb",
                   "injection_flag", "matched", "ra", "dec", "psfFlux", "psfFluxErr")
"""Matched-table columns the fake metrics read (see the data contracts)."""


def _check_matched(matched: pd.DataFrame) -> None:
    missing = [c for c in MATCHED_COLUMNS if c not in matched.columns]
    if missing:
        raise InputError(f"matched table: missing columns {missing} (expected the matched-table "
                         "contract of apqa.injection.match)")
    if matched["matched"].isna().any():
        raise InputError("matched table: column 'matched' has missing values; expected bool")


def compute_metrics(*, matched: pd.DataFrame | None = None,
                    dia_sources: pd.DataFrame | None = None,
                    real_ids: Iterable[int] | np.ndarray | None = None,
                    area_deg2: float | None = None, n_exposures: int | None = None,
                    bright_stars: pd.DataFrame | None = None,
                    diffim: Records | None = None, counts: Mapping[str, object] | None = None,
                    calibration: Records | None = None,
                    runtime: Mapping[str, Mapping[str, object]] | None = None,
                    tags: Mapping[str, str] | None = None, n_boot: int = 200,
                    seed: int = 0) -> list[Measurement]:
    """Compute all metrics from a run's products; every input is optional.

    Parameters
    ----------
    matched
        The matched table of injected fakes (contract of ``apqa.injection.match``); gives the
        completeness, photometry, centroid and forced-flux metrics, per band.
    dia_sources, real_ids
        The DiaSource table and the diaSourceIds that are real (matched to fakes or to
        simulator truth); give the false-DIASource and real/bogus metrics.
    area_deg2
        Sky area of the processed visit-detectors, for ``apqa.artifacts.falsePositiveDensity``.
    n_exposures
        Number of processed visit-detectors (per-detector rates, runtime per detector); by
        default the number of (visit, detector) pairs in ``dia_sources``.
    bright_stars
        Optional ``ra``, ``dec`` of bright stars for ``nearBrightStarFraction``.
    diffim, calibration
        Per-exposure records (see :mod:`apqa.metrics.calibration`).
    counts
        Association, APDB and alert counts (see :mod:`apqa.metrics.counts`).
    runtime
        ``{stage: {"wall": s, "cpu": s, "peak_rss": bytes}}``.
    tags
        Tags put on every measurement (dataset, algorithm, ...); ``band`` is added from the
        data when it has one band.
    n_boot, seed
        Bootstrap replicates and seed of the completeness fits.

    Returns
    -------
    list of Measurement

    Examples
    --------
    >>> ms = compute_metrics(runtime={"diff": {"wall": 12.0, "cpu": 20.0}}, n_exposures=4,
    ...                      tags={"dataset": "hits-sim"})
    >>> [(m.metric, m.value) for m in ms if m.metric.endswith("PerDetector")]
    [('apqa.runtime.wallPerDetector', 3.0), ('apqa.runtime.cpuPerDetector', 5.0)]
    """
    base = {str(k): str(v) for k, v in (tags or {}).items()}
    out: list[Measurement] = []
    if matched is not None:
        _check_matched(matched)
        for i, (band, group) in enumerate(matched.groupby("band", sort=True, dropna=False)):
            band_tags = {**base, "band": str(band)} if "band" not in base else base
            out += completeness_metrics(group, band_tags, n_boot=n_boot, seed=seed + 100 * i)
            out += photometry_metrics(group, band_tags)
    if dia_sources is not None:
        if real_ids is None:
            raise InputError("dia_sources given without real_ids: the false-DIASource metrics "
                             "need the set of real diaSourceIds")
        bands = dia_sources["band"].dropna().unique() if "band" in dia_sources else []
        art_tags = {**base, "band": str(bands[0])} if len(bands) == 1 and "band" not in base \
            else base
        out += artifact_metrics(dia_sources, np.asarray(list(real_ids) if not isinstance(
            real_ids, np.ndarray) else real_ids), art_tags, area_deg2=area_deg2,
            n_exposures=n_exposures, bright_stars=bright_stars)
        if n_exposures is None:
            n_exposures = len(dia_sources[["visit", "detector"]].drop_duplicates())
    if diffim is not None:
        out += diffim_metrics(diffim, base)
    if calibration is not None:
        out += calibration_metrics(calibration, base)
    if counts is not None:
        out += count_metrics(counts, base)
    if runtime is not None:
        out += runtime_metrics(runtime, base, n_exposures)
    return out
