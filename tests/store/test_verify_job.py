"""lsst.verify Job JSON export: structure, names, units, one job per tag set."""

from __future__ import annotations

import json

import astropy.units as u
from typer.testing import CliRunner

from apqa.cli.app import register_commands
from apqa.metrics import METRICS, Measurement
from apqa.store import MetricStore
from apqa.store.verify_job import apqa_name, verify_jobs, verify_name

runner = CliRunner()
app = register_commands()


def _run(tmp_path):
    store = MetricStore(tmp_path / "m.db")
    with store.recording("hits-sim", "cfg", git_sha="abc", git_branch="main") as rec:
        rec.add([
            Measurement("apqa.completeness.snr50", 5.5, None, 0.1, {"fake_class": "isolated"}),
            Measurement("apqa.completeness.m50", 24.1, "mag", 0.02, {"fake_class": "isolated"}),
            Measurement("apqa.completeness.snr50", 6.5, None, 0.3, {"fake_class": "hosted"}),
            Measurement("apqa.runtime.wallPerDetector", 0.5, "min"),
            Measurement("apqa.calibration.zeroPointError", float("nan")),
        ])
    return store, store.resolve_run("latest")


def test_names_map_both_ways():
    for name in METRICS:
        package, metric = verify_name(name).split(".")
        assert package.startswith("apqa_") and metric
        assert apqa_name(verify_name(name)) == name


def test_job_documents(tmp_path):
    store, run = _run(tmp_path)
    jobs = verify_jobs(run, store.measurements(run.id))
    assert len(jobs) == 3  # tag sets: {}, hosted, isolated
    by_class = {job["meta"].get("fake_class"): job for job in jobs}
    iso = by_class["isolated"]
    assert set(iso) == {"measurements", "blobs", "metrics", "specs", "meta"}
    assert iso["meta"]["apqa_run_id"] == run.id and iso["meta"]["dataset"] == "hits-sim"
    blobs = {b["identifier"]: b for b in iso["blobs"]}
    values = {}
    for m in iso["measurements"]:
        assert set(m) == {"metric", "identifier", "value", "unit", "blob_refs"}
        (blob,) = (blobs[ref] for ref in m["blob_refs"])
        assert blob["name"] == m["metric"]
        values[m["metric"]] = (m["value"] * u.Unit(m["unit"]),
                               blob["data"]["uncertainty"]["value"])
    assert values["apqa_completeness.snr50"] == (5.5 * u.dimensionless_unscaled, 0.1)
    assert values["apqa_completeness.m50"] == (24.1 * u.mag, 0.02)
    assert {m["name"] for m in iso["metrics"]} == set(values)
    untagged = by_class[None]["measurements"]
    wall = next(m for m in untagged if m["metric"] == "apqa_runtime.wallPerDetector")
    assert (wall["value"], wall["unit"], wall["blob_refs"]) == (30.0, "s", [])  # metric unit
    zp = next(m for m in untagged if m["metric"] == "apqa_calibration.zeroPointError")
    assert zp["value"] is None and zp["unit"] is None
    assert verify_jobs(run, store.measurements(run.id)) == jobs  # deterministic ids


def test_export_verify_command(tmp_path):
    _run(tmp_path)
    out = tmp_path / "jobs"
    result = runner.invoke(app, ["export", "verify", "--db", str(tmp_path / "m.db"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 3 lsst.verify job file(s) for run 1" in result.stdout
    files = sorted(out.glob("*.verify.json"))
    assert [f.name for f in files] == [f"run1_{i:04d}.verify.json" for i in range(3)]
    assert all(json.loads(f.read_text())["meta"]["apqa_run_id"] == 1 for f in files)
