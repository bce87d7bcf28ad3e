"""compute_metrics: every family from one call, per band, with clear input errors."""

from __future__ import annotations

import pandas as pd
import pytest

from apqa.errors import InputError
from apqa.metrics import compute_metrics

from .synthetic import make_dia_sources, make_matched


def test_everything_from_one_call():
    matched = pd.concat([make_matched(6000, seed=1, band="g"),
                         make_matched(6000, seed=2, band="r", snr50=6.0)], ignore_index=True)
    dia, real_ids = make_dia_sources(300, 600, seed=3)
    ms = compute_metrics(
        matched=matched, dia_sources=dia, real_ids=set(real_ids.tolist()), area_deg2=1.5,
        diffim=[{"visit": 410001, "detector": 1, "noise_ratio": 1.01}],
        calibration=[{"visit": 410001, "detector": 1, "psf_fwhm": 1.1}],
        counts={"alerts": {"count": 10, "total_bytes": 10000}},
        runtime={"total": {"wall": 40.0, "cpu": 60.0}}, n_exposures=4,
        tags={"dataset": "hits-sim", "algorithm": "al"}, n_boot=50)
    assert all(m.tags["dataset"] == "hits-sim" for m in ms)
    snr50 = {m.tags["band"]: m for m in ms if m.metric == "apqa.completeness.snr50"
             and m.tags["fake_class"] == "all"}
    assert abs(snr50["g"].value - 5.0) < 3 * snr50["g"].uncertainty
    assert abs(snr50["r"].value - 6.0) < 3 * snr50["r"].uncertainty
    density = next(m for m in ms if m.metric == "apqa.artifacts.falsePositiveDensity")
    assert density.value == 400 and density.tags["band"] == "g"
    wall = next(m for m in ms if m.metric == "apqa.runtime.wallPerDetector")
    assert wall.value == 10
    names = {m.metric for m in ms}
    assert {"apqa.photometry.psfFluxPullStd", "apqa.diffim.noiseRatio", "apqa.alerts.count",
            "apqa.calibration.psfFwhm", "apqa.artifacts.rocAuc"} <= names
    keys = [(m.metric, tuple(sorted(m.tags.items()))) for m in ms]
    assert len(keys) == len(set(keys))  # every (metric, tags) once


def test_input_errors():
    matched = make_matched(100, seed=1).drop(columns=["truth_snr", "forced_flux"])
    with pytest.raises(InputError, match=r"matched table: missing columns \['forced_flux', "
                                         r"'truth_snr'\]"):
        compute_metrics(matched=matched)
    dia, _ = make_dia_sources(3, 3, seed=1)
    with pytest.raises(InputError, match="dia_sources given without real_ids"):
        compute_metrics(dia_sources=dia)
