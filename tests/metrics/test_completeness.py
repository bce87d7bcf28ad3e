"""Completeness: Wilson intervals, binned fractions, logistic fits against known curves."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from apqa.metrics.completeness import binned_completeness, completeness_metrics, fit_logistic
from apqa.metrics.stats import wilson_interval

from .synthetic import make_matched


def test_wilson_interval_known_values():
    # k=0, n=10, z=1: centre (1/20)/1.1, half-width (1/20)/1.1 -> [0, 1/11].
    lo, hi = wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    assert lo[0] == 0 and hi[0] == pytest.approx(1 / 11)
    assert (lo[1] + hi[1]) / 2 == pytest.approx(0.5)
    assert hi[1] - lo[1] == pytest.approx(2 * np.sqrt(0.025 + 1 / 400) / 1.1)
    assert hi[2] == pytest.approx(1) and lo[2] == pytest.approx(10 / 11)
    lo, hi = wilson_interval(np.array([3]), np.array([0]))
    assert np.isnan(lo[0]) and np.isnan(hi[0])


def test_binned_completeness_counts_exactly():
    x = np.array([0.5, 2.0, 4.0, 5.0, 7.0, 9.0, 15.0, 30.0])
    det = np.array([0, 0, 1, 0, 1, 1, 1, 1], bool)
    table = binned_completeness(x, det, (0, 3, 6, 8, 10, 20))
    assert table["bin"].tolist() == ["0-3", "3-6", "6-8", "8-10", "10-20"]
    assert table["n"].tolist() == [2, 2, 1, 1, 1]  # 30 is outside every bin
    assert table["k"].tolist() == [0, 1, 1, 1, 1]
    assert table["fraction"].tolist() == [0, 0.5, 1, 1, 1]


def test_logistic_fit_recovers_a_known_curve():
    rng = np.random.default_rng(5)
    snr = rng.uniform(0, 15, 20000)
    det = rng.random(20000) < 0.97 * expit((snr - 5.5) / 0.8)
    fit = fit_logistic(snr, det, n_boot=200, seed=1)
    assert abs(fit.x50 - 5.5) < 3 * fit.x50_err and fit.x50_err < 0.1
    assert abs(fit.width - 0.8) < 3 * fit.width_err
    assert abs(fit.plateau - 0.97) < 3 * fit.plateau_err
    mag = rng.uniform(20, 27, 20000)
    det = rng.random(20000) < expit(-(mag - 24.2) / 0.25)
    fit = fit_logistic(mag, det, decreasing=True, n_boot=200, seed=2)
    assert abs(fit.x50 - 24.2) < 3 * fit.x50_err and fit.x50_err < 0.02
    assert fit(np.array([fit.x50]), decreasing=True)[0] == pytest.approx(fit.plateau / 2)


def test_bootstrap_uncertainty_is_calibrated():
    """Over 40 independent data sets the truth lies within 1 sigma about 68% of the time."""
    rng = np.random.default_rng(8)
    pulls = []
    for i in range(40):
        snr = rng.uniform(0, 12, 1500)
        det = rng.random(1500) < 0.95 * expit((snr - 5.0) / 0.7)
        fit = fit_logistic(snr, det, n_boot=150, seed=i)
        pulls.append((fit.x50 - 5.0) / fit.x50_err)
    pulls = np.abs(pulls)
    assert 0.5 <= np.mean(pulls < 1) <= 0.88
    assert np.mean(pulls < 2) >= 0.85


def test_unconstrained_fits_return_none():
    rng = np.random.default_rng(2)
    assert fit_logistic(rng.uniform(0, 10, 40), np.ones(40, bool)) is None  # too few
    assert fit_logistic(rng.uniform(10, 20, 500), np.ones(500, bool)) is None  # all detected


def test_completeness_metrics_per_class():
    table = make_matched(30000, seed=3, detect_vs="mag", m50=24.3, m_width=0.25, plateau=0.97,
                         flagged_fraction=0.02)
    ms = completeness_metrics(table, {"band": "g"}, n_boot=100)
    by = {(m.metric, tuple(sorted(m.tags.items()))): m for m in ms}
    for cls in ("all", "isolated", "hosted", "negative"):
        m50 = by[("apqa.completeness.m50", (("band", "g"), ("fake_class", cls)))]
        assert m50.unit == "mag" and abs(m50.value - 24.3) < 3.5 * m50.uncertainty
    hosted_bins = {m.tags["host_sb"] for m in ms if "host_sb" in m.tags}
    assert hosted_bins == {"<20", "20-22", "22-24", ">=24"}
    flagged = by[("apqa.injection.flaggedFraction", (("band", "g"),))]
    assert abs(flagged.value - 0.02) < 3 * flagged.uncertainty
    n_all = by[("apqa.completeness.nFakes", (("band", "g"), ("fake_class", "all")))].value
    assert n_all == (table["injection_flag"] == 0).sum()
    # Binned fractions are exact counts of the unflagged fakes.
    ok = table[(table["injection_flag"] == 0) & (table["fake_class"] == "isolated")]
    sel = (ok["truth_mag"] >= 22) & (ok["truth_mag"] < 24)
    frac = by[("apqa.completeness.fractionInMagBin",
               (("band", "g"), ("fake_class", "isolated"), ("mag_bin", "22-24")))]
    assert frac.value == pytest.approx(ok.loc[sel, "matched"].mean())


def test_snr50_and_fraction_snr10_from_a_known_curve():
    table = make_matched(40000, seed=4, snr50=5.2, width=0.6, plateau=0.99)
    ms = completeness_metrics(table, {}, n_boot=100)
    by = {(m.metric, m.tags.get("fake_class"), m.tags.get("host_sb")): m for m in ms}
    snr50 = by[("apqa.completeness.snr50", "isolated", None)]
    assert abs(snr50.value - 5.2) < 3 * snr50.uncertainty and snr50.uncertainty < 0.1
    frac = by[("apqa.completeness.fraction_snr10", "isolated", None)]
    # Expected: plateau * mean logistic over S/N 10-20 (essentially the plateau).
    assert abs(frac.value - 0.99) < 3 * frac.uncertainty


def test_bootstrap_uncertainty_is_stable_against_rounding():
    # Few fakes: many bootstrap replicates separate detected from missed perfectly; their fits
    # must not wander (the old unbounded fit changed x50_err by up to 100% for 1e-9 changes).
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = int(rng.integers(50, 150))
        snr = rng.uniform(0, 20, n)
        det = rng.random(n) < 1 / (1 + np.exp(-(snr - 5) / 0.5))
        a = fit_logistic(snr, det, n_boot=200)
        b = fit_logistic(snr * (1 + 1e-9 * rng.normal(size=n)), det, n_boot=200)
        if a is not None:
            assert b.x50 == pytest.approx(a.x50, rel=1e-6)
            assert b.x50_err == pytest.approx(a.x50_err, rel=1e-3)
