"""psFlux bias, pulls, forced-flux noise and centroid offsets against constructed truth."""

from __future__ import annotations

import numpy as np
import pytest

from apqa.metrics.photometry import photometry_metrics

from .synthetic import SIGMA_NJY, make_matched


def _by_bin(ms, metric):
    return {m.tags["snr_bin"]: m for m in ms if m.metric == metric}


def test_flux_bias_and_pull_width_are_recovered():
    # Everything detected so that no selection biases the faint bins.
    table = make_matched(40000, seed=1, snr50=0.0, width=0.01, plateau=1.0, flux_bias=0.02,
                         pull_std=1.3, noise_ratio=1.1, mag_range=(18, 24),
                         classes=("isolated", "hosted"))
    ms = photometry_metrics(table, {"band": "g"})
    bias = _by_bin(ms, "apqa.photometry.psfFluxBias")
    assert set(bias) == {"5-10", "10-20", "20-50", "50-100", "100-inf", "10-inf"}
    for label in ("20-50", "50-100", "100-inf", "10-inf"):
        assert abs(bias[label].value - 0.02) < 3.5 * bias[label].uncertainty, label
    assert bias["100-inf"].uncertainty < 0.002
    pull_std = _by_bin(ms, "apqa.photometry.psfFluxPullStd")
    # Pull = (psfFlux - truth) / err: std 1.3, shifted by the bias times S/N (0.1-0.2 in the
    # 5-10 bin, which barely widens it).
    assert abs(pull_std["5-10"].value - 1.3) < 3 * pull_std["5-10"].uncertainty
    pull_med = _by_bin(ms, "apqa.photometry.psfFluxPullMedian")
    expected_median = np.median(0.02 * table.loc[table["truth_snr"] >= 100, "truth_snr"])
    assert pull_med["100-inf"].value == pytest.approx(expected_median, rel=0.05)
    forced = next(m for m in ms if m.metric == "apqa.diffim.forcedFluxPullStd")
    assert abs(forced.value - 1.1) < 3 * forced.uncertainty and forced.uncertainty < 0.01


def test_unbiased_photometry_passes_near_zero_and_one():
    table = make_matched(20000, seed=2, snr50=0.0, width=0.01, plateau=1.0, mag_range=(18, 24))
    ms = photometry_metrics(table, {})
    bias = _by_bin(ms, "apqa.photometry.psfFluxBias")["10-inf"]
    assert abs(bias.value) < 3 * bias.uncertainty
    std = _by_bin(ms, "apqa.photometry.psfFluxPullStd")["10-inf"]
    assert abs(std.value - 1) < 3 * std.uncertainty


def test_centroid_offsets_in_mas():
    table = make_matched(20000, seed=3, snr50=0.0, width=0.01, plateau=1.0,
                         centroid_bias_mas=(30.0, -12.0), centroid_sigma_mas=25.0,
                         mag_range=(18, 24))
    ms = photometry_metrics(table, {})
    ra = _by_bin(ms, "apqa.photometry.centroidBiasRa")["10-inf"]
    dec = _by_bin(ms, "apqa.photometry.centroidBiasDec")["10-inf"]
    scatter = _by_bin(ms, "apqa.photometry.centroidScatter")["10-inf"]
    assert ra.unit == "mas" and abs(ra.value - 30) < 3 * ra.uncertainty
    assert abs(dec.value + 12) < 3 * dec.uncertainty
    assert abs(scatter.value - 25) < 3 * scatter.uncertainty
    offset = _by_bin(ms, "apqa.photometry.centroidOffset")["10-inf"]
    # Median of a 2-D offset with mean (30, -12) and sigma 25 per axis (Rice distribution).
    rng = np.random.default_rng(0)
    sample = np.hypot(rng.normal(30, 25, 10**6), rng.normal(-12, 25, 10**6))
    assert abs(offset.value - np.median(sample)) < 3 * offset.uncertainty


def test_ra_wraps_around_zero():
    table = make_matched(200, seed=4, snr50=0.0, width=0.01, plateau=1.0, mag_range=(18, 20),
                         centroid_sigma_mas=1.0)
    table["truth_ra"] = 359.99999
    table["ra"] = (359.99999 + 20 / 3.6e6 / np.cos(np.deg2rad(table["truth_dec"]))) % 360
    ms = photometry_metrics(table, {})
    assert _by_bin(ms, "apqa.photometry.centroidBiasRa")["10-inf"].value == pytest.approx(
        20, abs=0.1)
    assert SIGMA_NJY > 0
