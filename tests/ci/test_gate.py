"""The gate: thresholds on stored runs, and a regression test that flags real drops only."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from metrics.synthetic import make_matched

from apqa.ci.gate import evaluate_gate
from apqa.ci.report import markdown, write_junit
from apqa.ci.thresholds import load_thresholds
from apqa.errors import InputError
from apqa.metrics import Measurement, compute_metrics
from apqa.store import MetricStore

REPO = Path(__file__).resolve().parents[2]


def _record(store: MetricStore, seed: int, *, branch: str = "main", snr50: float = 5.0,
            wall: float = 20.0, noise_ratio: float = 1.0) -> int:
    """Store a run computed from a constructed matched table (6,000 fakes)."""
    matched = make_matched(6000, seed=seed, snr50=snr50, classes=("isolated",))
    measurements = compute_metrics(
        matched=matched, diffim=[{"visit": 1, "detector": 1, "noise_ratio": noise_ratio},
                                 {"visit": 2, "detector": 1, "noise_ratio": noise_ratio}],
        runtime={"total": {"wall": wall}}, n_exposures=1, tags={"dataset": "hits-sim"},
        n_boot=60, seed=seed)
    with store.recording("hits-sim", "cfg", git_sha=f"sha{seed}", git_branch=branch) as run:
        run.add(measurements)
    return run.run_id


@pytest.fixture
def store(tmp_path):
    return MetricStore(tmp_path / "metrics.db")


def test_shipped_thresholds_pass_a_good_run_and_fail_a_bad_one(store):
    limits = load_thresholds(REPO / "ci" / "thresholds.yaml")
    good = _record(store, 1)
    report = evaluate_gate(store, good, limits)
    assert report.passed, [c for c in report.checks if not c.passed]
    bad = _record(store, 2, snr50=11.0, wall=60.0, noise_ratio=1.2)
    report = evaluate_gate(store, bad, limits)
    failed = {c.metric for c in report.failures}
    assert failed == {"apqa.completeness.snr50", "apqa.completeness.fraction_snr10",
                      "apqa.diffim.noiseRatio", "apqa.runtime.wallPerDetector"}


def test_missing_and_nan_measurements_fail(tmp_path, store):
    with store.recording("hits-sim", "cfg", git_sha="s", git_branch="main") as run:
        run.add([Measurement("apqa.completeness.m50", float("nan"), tags={"band": "g"})])
    path = tmp_path / "t.yaml"
    path.write_text("thresholds:\n"
                    "  - {metric: apqa.completeness.m50, op: '>', value: 24}\n"
                    "  - {metric: apqa.artifacts.rocAuc, op: '>', value: 0.9}\n")
    report = evaluate_gate(store, "latest", load_thresholds(path))
    details = sorted(c.detail for c in report.failures)
    assert details == ["no measurement in this run", "value is NaN"]


def test_regression_passes_noise_and_flags_a_real_drop(store):
    for seed in range(10, 16):  # main-branch history
        _record(store, seed, wall=20.0 + 0.5 * np.sin(seed))
    for seed in range(20, 25):  # independent noisy runs of unchanged code pass
        run = _record(store, seed, branch="feature", wall=20.0 + 0.5 * np.cos(seed))
        report = evaluate_gate(store, run, [], baseline="latest-main")
        assert report.baseline.git_branch == "main"
        assert report.passed, [c.detail for c in report.failures]
        assert report.regression_tested > 20 and report.z_limit > 3
    # Completeness worse by 1 in S/N and the pipeline 25% slower: both flagged.
    run = _record(store, 30, branch="feature", snr50=6.0, wall=25.0)
    report = evaluate_gate(store, run, [], baseline="latest-main")
    failed = {(c.metric, c.tags.get("fake_class")) for c in report.failures}
    assert ("apqa.completeness.snr50", "isolated") in failed
    assert ("apqa.runtime.wallPerDetector", None) in failed
    assert all(c.kind == "regression" for c in report.failures)
    # Better numbers never fail.
    run = _record(store, 31, branch="feature", snr50=4.0, wall=15.0)
    report = evaluate_gate(store, run, [], baseline="latest-main")
    assert report.passed and report.improved >= 2


def test_baselines(store):
    first = _record(store, 40, branch="feature")
    report = evaluate_gate(store, first, [], baseline="latest-main")
    assert report.baseline is None and report.passed
    assert report.notes == ["no succeeded main run of hits-sim: regression test skipped"]
    with pytest.raises(InputError, match=f"is the run being gated \\({first}\\)"):
        evaluate_gate(store, first, [], baseline=str(first))
    with pytest.raises(InputError, match="run 77 does not exist"):
        evaluate_gate(store, first, [], baseline="77")
    failed_run = store.start_run("hits-sim", "cfg")
    store.finish_run(failed_run, "failed", "boom")
    report = evaluate_gate(store, failed_run, [])
    assert not report.passed and report.failures[0].detail == f"run {failed_run} is failed"


def test_reports(tmp_path, store):
    _record(store, 50)
    run = _record(store, 51, snr50=7.0)
    limits = load_thresholds(REPO / "ci" / "thresholds.yaml")
    report = evaluate_gate(store, run, limits, baseline="latest-main")
    write_junit(report, tmp_path / "gate.xml")
    suite = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) == len(report.checks)
    failures = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures")) == len(failures) == len(report.failures) > 0
    assert any("apqa.completeness.snr50 [dataset=hits-sim, band=g, fake_class=isolated]"
               in c.get("name").replace("band=g, dataset=hits-sim", "dataset=hits-sim, band=g")
               for c in failures)
    text = markdown(report)
    assert text.startswith("### ❌ apqa gate") and "| **FAIL** | threshold |" in text
    assert "| **FAIL** | regression | `apqa.completeness.snr50` |" in text
