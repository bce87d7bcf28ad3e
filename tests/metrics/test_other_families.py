"""Counts, calibration, difference-image quality and runtime metrics."""

from __future__ import annotations

import astropy.units as u
import pandas as pd
import pytest

from apqa.errors import InputError
from apqa.metrics.calibration import calibration_metrics, diffim_metrics
from apqa.metrics.counts import count_metrics
from apqa.metrics.runtime import runtime_metrics


def _index(ms):
    return {(m.metric, m.tags.get("visit"), m.tags.get("stage")): m for m in ms}


def test_ap_verify_counts():
    per_visit = [
        {"visit": 1, "numNewDiaObjects": 10, "numUnassociatedDiaObjects": 4,
         "numUpdatedDiaObjects": 6, "numDiaSources": 16, "numSciSources": 800},
        {"visit": 2, "numNewDiaObjects": 5, "numUnassociatedDiaObjects": 2,
         "numUpdatedDiaObjects": 18, "numDiaSources": 23, "numSciSources": 700},
    ]
    objects = pd.DataFrame({"nDiaSources": [1, 1, 3, 2, 1]})
    ms = _index(count_metrics({"per_visit": per_visit, "dia_objects": objects,
                               "alerts": {"count": 39, "total_bytes": 39 * 2048}}, {}))
    assert ms[("apqa.association.numNewDiaObjects", "1", None)].value == 10
    assert ms[("apqa.association.numNewDiaObjects", "all", None)].value == 15
    assert ms[("apqa.association.numUnassociatedDiaObjects", "all", None)].value == 6
    assert ms[("apqa.association.fracUpdatedDiaObjects", "1", None)].value == 0.6
    assert ms[("apqa.association.fracUpdatedDiaObjects", "all", None)].value == 24 / 30
    assert ms[("apqa.association.totalUnassociatedDiaObjects", None, None)].value == 3
    assert ms[("apqa.diffim.numSciSources", "all", None)].value == 1500
    assert ms[("apqa.diffim.fracDiaSourcesToSciSources", "2", None)].value == 23 / 700
    assert ms[("apqa.alerts.meanSize", None, None)].value == 2048
    assert ms[("apqa.alerts.meanSize", None, None)].unit == "byte"
    with pytest.raises(InputError, match=r"counts: unknown keys \['alert'\]"):
        count_metrics({"alert": {}}, {})
    with pytest.raises(InputError, match=r"counts.per_visit: every record needs .visit."):
        count_metrics({"per_visit": [{"numNewDiaObjects": 1}]}, {})


def test_calibration_and_diffim_medians():
    records = [{"visit": v, "detector": 1, "psf_fwhm": f, "astrom_scatter": 5.0 + v,
                "zero_point_error": 2.0} for v, f in ((1, 1.0), (2, 1.2), (3, 1.1))]
    records[0]["zero_point_error"] = 0.003 * u.mag  # Quantities are converted
    ms = _index(calibration_metrics(records, {"dataset": "hits-sim"}))
    assert ms[("apqa.calibration.psfFwhm", "all", None)].value == pytest.approx(1.1)
    assert ms[("apqa.calibration.psfFwhm", "all", None)].tags["detector"] == "all"
    assert ms[("apqa.calibration.zeroPointError", "1", None)].value == pytest.approx(3.0)
    assert ms[("apqa.calibration.astromScatter", "all", None)].unit == "mas"
    ms = _index(diffim_metrics(pd.DataFrame({"visit": [1, 2], "detector": [1, 1],
                                             "noise_ratio": [1.0, 1.04]}), {}))
    assert ms[("apqa.diffim.noiseRatio", "all", None)].value == pytest.approx(1.02)
    with pytest.raises(InputError, match=r"calibration: 'psf_fwhm' in s does not convert"):
        calibration_metrics([{"visit": 1, "psf_fwhm": 3 * u.s}], {})


def test_runtime_per_stage_and_per_detector():
    runtime = {"isr": {"wall": 4.0, "cpu": 3.5, "peak_rss": 1.5e9},
               "diff": {"wall": 2 * u.min, "cpu": 100.0}}
    ms = _index(runtime_metrics(runtime, {}, n_exposures=4))
    assert ms[("apqa.runtime.wall", None, "diff")].value == 120
    assert ms[("apqa.runtime.peakRss", None, "isr")].unit == "byte"
    assert ms[("apqa.runtime.wallPerDetector", None, None)].value == 31
    assert ms[("apqa.runtime.cpuPerDetector", None, None)].value == pytest.approx(25.875)
    with_total = _index(runtime_metrics({**runtime, "total": {"wall": 200.0}}, {}, 4))
    assert with_total[("apqa.runtime.wallPerDetector", None, None)].value == 50
    with pytest.raises(InputError, match=r"runtime\['isr'\]: expected a mapping"):
        runtime_metrics({"isr": {"walltime": 3}}, {})
