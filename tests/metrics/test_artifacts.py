"""False DIASources and real/bogus ROC metrics against constructed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from apqa.errors import InputError
from apqa.metrics.artifacts import artifact_metrics, near_positions, roc_summary

from .synthetic import make_dia_sources


def test_roc_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    real = np.round(rng.normal(1, 1, 300), 1)  # ties on purpose
    false = np.round(rng.normal(0, 1, 400), 1)
    diff = real[:, None] - false[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert roc_summary(real, false)["auc"] == pytest.approx(brute)


def test_gaussian_scores_give_the_analytic_roc_numbers():
    d = 2.0
    table, real_ids = make_dia_sources(40000, 40000, seed=1, separation=d)
    ms = artifact_metrics(table, real_ids, {}, area_deg2=2.0)
    by = {(m.metric, m.tags.get("fnr") or m.tags.get("completeness")): m for m in ms}
    auc = by[("apqa.artifacts.rocAuc", None)]
    assert abs(auc.value - norm.cdf(d / np.sqrt(2))) < 3 * auc.uncertainty
    eer = by[("apqa.artifacts.equalErrorRate", None)]
    assert abs(eer.value - norm.cdf(-d / 2)) < 3 * eer.uncertainty
    for fnr in (0.01, 0.03, 0.1):
        fpr = by[("apqa.artifacts.fprAtFnr", f"{fnr:g}")]
        assert abs(fpr.value - norm.sf(d + norm.ppf(fnr))) < 4 * fpr.uncertainty, fnr
    purity = by[("apqa.artifacts.purityAtCompleteness", "0.9")]
    t = d + norm.ppf(0.1)
    expected = 0.9 / (0.9 + norm.sf(t))  # equal numbers of reals and false detections
    assert abs(purity.value - expected) < 4 * purity.uncertainty


def test_false_rates_and_fractions_are_exact():
    table, real_ids = make_dia_sources(500, 1000, seed=2, dipole_fraction=0.2,
                                       negative_fraction=0.4, masked_fraction=0.1, n_visits=4)
    ms = artifact_metrics(table, real_ids, {"band": "g"}, area_deg2=0.5)
    by = {m.metric: m for m in ms}
    density = by["apqa.artifacts.falsePositiveDensity"]
    assert density.value == 2000 and density.uncertainty == pytest.approx(np.sqrt(1000) / 0.5)
    assert density.unit == "1 / deg2"
    assert by["apqa.artifacts.falsePerDetector"].value == 250
    assert by["apqa.artifacts.dipoleFraction"].value == pytest.approx(0.2)
    assert by["apqa.artifacts.negativeFraction"].value == pytest.approx(0.4)
    assert by["apqa.artifacts.maskedFraction"].value == pytest.approx(0.1)
    assert "apqa.artifacts.nearBrightStarFraction" not in by


def test_near_bright_stars():
    table, real_ids = make_dia_sources(0, 4, seed=3)
    table["ra"] = [10.0, 10.0, 10.0, 200.0]
    table["dec"] = [0.0, 5 / 3600, 12 / 3600, -30.0]
    stars = pd.DataFrame({"ra": [10.0], "dec": [0.0]})
    near = near_positions(table["ra"].to_numpy(), table["dec"].to_numpy(), stars["ra"],
                          stars["dec"], 10.0)
    assert near.tolist() == [True, True, False, False]
    ms = artifact_metrics(table, real_ids, {}, bright_stars=stars)
    frac = next(m for m in ms if m.metric == "apqa.artifacts.nearBrightStarFraction")
    assert frac.value == 0.5
    # Without real detections there is no ROC.
    assert not any(m.metric == "apqa.artifacts.rocAuc" for m in ms)


def test_bad_inputs_name_the_problem():
    table, real_ids = make_dia_sources(5, 5, seed=4)
    with pytest.raises(InputError, match="area_deg2 must be positive"):
        artifact_metrics(table, real_ids, {}, area_deg2=0.0)
    with pytest.raises(InputError, match="'diaSourceId' is missing"):
        artifact_metrics(table.drop(columns="diaSourceId"), real_ids, {})
