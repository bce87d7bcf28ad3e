"""Thresholds files: parsing, validation errors and unit conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from apqa.ci.thresholds import load_thresholds
from apqa.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_shipped_thresholds_load():
    limits = load_thresholds(REPO / "ci" / "thresholds.yaml")
    names = {t.metric for t in limits}
    assert {"apqa.completeness.snr50", "apqa.completeness.fraction_snr10",
            "apqa.photometry.psfFluxBias", "apqa.photometry.psfFluxPullStd",
            "apqa.diffim.noiseRatio", "apqa.runtime.wallPerDetector"} <= names


def test_units_are_converted(tmp_path):
    path = _write(tmp_path, """
thresholds:
  - {metric: apqa.completeness.fraction_snr10, op: ">=", value: 95, unit: "%"}
  - {metric: apqa.runtime.wallPerDetector, op: "<=", value: 0.5, unit: min}
  - {metric: apqa.completeness.m50, op: ">", value: 24000, unit: mmag, tags: {band: g}}
  - {metric: apqa.artifacts.falsePositiveDensity, op: "<", value: 1, unit: 1 / arcmin2}
""")
    frac, wall, m50, density = load_thresholds(path)
    assert frac.holds(0.951, "") and not frac.holds(0.949, "")
    assert frac.holds(96, "%")
    assert wall.holds(29, "s") and wall.holds(0.49, "min") and not wall.holds(31, "s")
    assert m50.holds(24.01, "mag") and not m50.holds(23.99, "mag") and m50.tags == {"band": "g"}
    assert density.holds(3599, "1 / deg2") and not density.holds(3601, "1 / deg2")
    assert not wall.holds(float("nan"), "s")
    assert m50.selects({"band": "g", "fake_class": "all"}) and not m50.selects({"band": "r"})
    assert m50.text == ">= 24000 mmag".replace(">=", ">")


@pytest.mark.parametrize(("text", "message"), [
    ("thresholds:\n  - {metric: apqa.completeness.snr51, op: '<', value: 6}",
     r"thresholds\[0\] \(apqa.completeness.snr51\): unknown metric 'apqa.completeness.snr51'"),
    ("thresholds:\n  - {metric: apqa.completeness.snr50, op: '=<', value: 6}",
     r"thresholds\[0\] \(apqa.completeness.snr50\): op '=<' is not one of < <= > >= =="),
    ("thresholds:\n  - {metric: apqa.runtime.wall, op: '<', value: 6, unit: mas}",
     r"unit 'mas' does not convert to 's'"),
    ("thresholds:\n  - {metric: apqa.runtime.wall, op: '<', value: fast}",
     r"value must be a number, got 'fast'"),
    ("thresholds:\n  - {metric: apqa.runtime.wall, op: '<'}", r"'value' is required"),
    ("thresholds:\n  - {metric: apqa.runtime.wall, op: '<', value: 1, tag: {a: b}}",
     r"unknown keys \['tag'\]"),
    ("limits: []", r"expected a list under 'thresholds:'"),
    ("thresholds: [", r"not valid YAML"),
])
def test_errors_name_file_entry_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_thresholds(path)
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.yaml: thresholds file not found"):
        load_thresholds(tmp_path / "absent.yaml")
