"""The metric registry and the Measurement type."""

from __future__ import annotations

import astropy.units as u
import pytest

from apqa.errors import InputError
from apqa.metrics.registry import METRICS, Measurement, convert, get_metric

FIXED_NAMES = {  # names the issue fixes, with their units
    "apqa.completeness.snr50": "", "apqa.completeness.m50": "mag",
    "apqa.completeness.fraction_snr10": "", "apqa.photometry.psfFluxBias": "",
    "apqa.photometry.psfFluxPullStd": "", "apqa.artifacts.falsePositiveDensity": "1 / deg2",
    "apqa.artifacts.rocAuc": "", "apqa.diffim.noiseRatio": "",
    "apqa.association.numNewDiaObjects": "ct", "apqa.association.numUnassociatedDiaObjects": "ct",
    "apqa.runtime.wallPerDetector": "s",
}


def test_fixed_names_are_declared_with_their_units():
    for name, unit in FIXED_NAMES.items():
        assert METRICS[name].unit_str == unit, name
    for definition in METRICS.values():
        assert definition.name.count(".") == 2 and definition.description
        assert definition.better in ("higher", "lower", "zero", "one", "none")


def test_unknown_metric_is_an_error():
    with pytest.raises(InputError, match=r"unknown metric 'apqa.completeness.snr51'"):
        Measurement("apqa.completeness.snr51", 5.0)
    with pytest.raises(InputError, match="unknown metric"):
        get_metric("nope")


def test_units_are_checked_and_converted():
    m = Measurement("apqa.runtime.wallPerDetector", 2.0, "min", 0.5, {"visit": 3})
    assert m.unit == "min" and m.tags == {"visit": "3"}
    assert m.quantity == 2 * u.min
    assert m.in_metric_unit() == (120.0, 30.0)
    assert Measurement("apqa.calibration.zeroPointError", 0.004, u.mag).in_metric_unit()[0] \
        == pytest.approx(4.0)
    assert convert(95, "%", "apqa.completeness.fraction_snr10") == pytest.approx(0.95)
    with pytest.raises(InputError, match=r"unit 'mas' does not convert to 's'"):
        Measurement("apqa.runtime.wall", 1.0, "mas")
    with pytest.raises(InputError, match=r"unit 'furlongs' is not an astropy unit"):
        Measurement("apqa.runtime.wall", 1.0, "furlongs")
    assert Measurement("apqa.completeness.m50", 24.0).unit == "mag"
    assert Measurement("apqa.completeness.m50", 24.0, uncertainty=float("nan")).uncertainty \
        is None


def test_worsening_follows_the_direction():
    assert METRICS["apqa.completeness.snr50"].worsening(6.0, 5.0) == 1.0
    assert METRICS["apqa.completeness.m50"].worsening(24.0, 24.5) == 0.5
    assert METRICS["apqa.photometry.psfFluxBias"].worsening(0.01, -0.01) == 0.0
    assert METRICS["apqa.photometry.psfFluxPullStd"].worsening(0.8, 1.1) == pytest.approx(0.1)
    assert METRICS["apqa.association.numNewDiaObjects"].worsening(100, 1) == 0.0
