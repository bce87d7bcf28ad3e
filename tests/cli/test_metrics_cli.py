"""apqa metrics / db / gate on a real SQLite store, through Typer's runner and a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.metrics import METRICS, Measurement
from apqa.store import MetricStore

runner = CliRunner()
app = register_commands()
APQA = shutil.which("apqa") or str(Path(sys.executable).parent / "apqa")


def _runs(db: Path) -> None:
    """Run 1 (main): snr50 5.0 +- 0.1; run 2 (feature): snr50 6.0 +- 0.1 and slower."""
    store = MetricStore(db)
    for branch, snr50, wall in (("main", 5.0, 20.0), ("feature", 6.0, 24.0)):
        with store.recording("hits-sim", "cfg", git_sha="abc", git_branch=branch) as run:
            run.add([Measurement("apqa.completeness.snr50", snr50, None, 0.1,
                                 {"fake_class": "isolated"}),
                     Measurement("apqa.runtime.wallPerDetector", wall, "s", 0.5)])


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "metrics.db"
    _runs(path)
    return path


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0]


def test_help_has_examples():
    for args in (["metrics", "--help"], ["metrics", "show", "--help"], ["gate", "--help"],
                 ["db", "upgrade", "--help"], ["export", "influx", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Examples" in result.stdout, args


def test_metrics_list():
    result = runner.invoke(app, ["metrics", "list", "--json"])
    listed = json.loads(result.stdout)
    assert [d["name"] for d in listed] == list(METRICS)
    wall = next(d for d in listed if d["name"] == "apqa.runtime.wallPerDetector")
    assert (wall["unit"], wall["better"], wall["stage"]) == ("s", "lower", "runtime")
    result = runner.invoke(app, ["metrics", "list", "--metric", "apqa.runtime"])
    assert "5 apqa metrics" in result.stdout and "apqa.completeness" not in result.stdout


def test_metrics_show_and_compare(db):
    result = runner.invoke(app, ["metrics", "show", "latest", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["run"] == 2 and shown["status"] == "succeeded"
    assert {(m["metric"], m["value"], m["uncertainty"]) for m in shown["measurements"]} == {
        ("apqa.completeness.snr50", 6.0, 0.1), ("apqa.runtime.wallPerDetector", 24.0, 0.5)}
    result = runner.invoke(app, ["metrics", "show", "1"], env={"APQA_DB": str(db)})
    assert "run 1: hits-sim, succeeded" in result.stdout and "5 ± 0.1" in result.stdout
    result = runner.invoke(app, ["metrics", "compare", "1", "2", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "+7.1" in result.stdout  # (6 - 5) / sqrt(0.1^2 + 0.1^2) sigma worse
    assert "+5.7" in result.stdout  # (24 - 20) / sqrt(0.5^2 + 0.5^2)
    result = runner.invoke(app, ["db", "runs", "--db", str(db)])
    assert "feature" in result.stdout and "main" in result.stdout


def test_errors_are_one_line(db, tmp_path):
    _one_line_error(runner.invoke(app, ["metrics", "show", "9", "--db", str(db)]),
                    "run 9 does not exist")
    _one_line_error(runner.invoke(app, ["metrics", "show", "latest", "--db",
                                        str(tmp_path / "none.db")]), "no metric database at")


def _thresholds(tmp_path, limit: float) -> Path:
    path = tmp_path / f"t{limit}.yaml"
    path.write_text("thresholds:\n"
                    f"  - {{metric: apqa.completeness.snr50, op: '<=', value: {limit},\n"
                    "     tags: {fake_class: isolated}}\n"
                    "  - {metric: apqa.runtime.wallPerDetector, op: '<=', value: 0.5, "
                    "unit: min}\n")
    return path


def test_gate_exit_codes_and_reports(db, tmp_path):
    ok = runner.invoke(app, ["gate", "--db", str(db), "--run", "1", "--thresholds",
                             str(_thresholds(tmp_path, 6))])
    assert ok.exit_code == 0, ok.output
    assert "gate PASSED for run 1 (hits-sim): 2/2 threshold checks passed" in ok.stdout
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    bad = runner.invoke(app, ["gate", "--db", str(db), "--run", "latest", "--thresholds",
                              str(_thresholds(tmp_path, 6)), "--baseline", "latest-main",
                              "--junit", str(junit), "--markdown", str(md)])
    assert bad.exit_code == 1, bad.output
    assert "gate FAILED for run 2" in bad.stdout and "2 regressed" in bad.stdout
    assert 'failures="2"' in junit.read_text() and "| **FAIL** | regression |" in md.read_text()
    _one_line_error(runner.invoke(app, ["gate", "--db", str(db), "--run", "1", "--thresholds",
                                        str(tmp_path / "absent.yaml")]),
                    "thresholds file not found")
    _one_line_error(runner.invoke(app, ["gate", "--db", str(db), "--run", "5", "--thresholds",
                                        str(_thresholds(tmp_path, 6))]), "run 5 does not exist")


def test_gate_exit_code_of_the_real_process(db, tmp_path):
    args = [APQA, "gate", "--db", str(db), "--run", "2", "--thresholds",
            str(_thresholds(tmp_path, 5.5))]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr
    assert "FAIL" in result.stdout
