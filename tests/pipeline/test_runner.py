"""``inject_and_run`` end to end on a small part of a simulated detector: metrics against truth,
the metric store and gate, the APDB and alerts, Dask worker processes, resume and checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apqa.ci import load_thresholds
from apqa.pipeline.apdb import Apdb
from apqa.pipeline.inject_run import RunOptions, inject_and_run
from apqa.pipeline.run_layout import finished, unit_dir
from apqa.pipeline.run_units import InjectRunConfig
from apqa.store import MetricStore

THRESHOLDS = Path(__file__).parents[2] / "ci" / "thresholds.yaml"
# A 1024x1024 piece of the detector; denser stars so the piece still has enough reference stars.
CONFIG = InjectRunConfig(n_fakes=100, crop=(512, 1024, 1024, 1024),
                         fake_kinds=["point", "variable", "negative"],
                         spec_overrides={"star_density": 16000})


def _values(measurements) -> dict:
    """Measurements other than runtime ones (those depend on the machine), by name and tags."""
    out = {}
    for m in measurements:
        if not m.metric.startswith("apqa.runtime."):
            key = (m.metric, tuple(sorted(m.tags.items())))
            out[(*key, "value")] = m.value
            out[(*key, "uncertainty")] = float("nan") if m.uncertainty is None else m.uncertainty
    return out


def _assert_same_metrics(got, expected) -> None:
    """Values equal to rounding; bootstrap uncertainties to 1e-3: the FFTs' float rounding
    differs between processes, and a bootstrap replicate whose fakes separate perfectly has a
    flat likelihood along its 50% point, so its fit moves by ~1e-4 with the last bits of S/N."""
    got, expected = _values(got), _values(expected)
    assert got.keys() == expected.keys()
    for kind, rel in (("value", 1e-6), ("uncertainty", 1e-3)):
        pick = [k for k in expected if k[-1] == kind]
        assert [got[k] for k in pick] == pytest.approx([expected[k] for k in pick], rel=rel,
                                                       nan_ok=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("irun")
    report = inject_and_run(RunOptions(out=root / "out", config=CONFIG, db=str(root / "m.db"),
                                       scheduler="process", thresholds=THRESHOLDS))
    return root, report


def test_end_to_end_metrics_store_gate_apdb_alerts(run):
    root, report = run
    assert report.n_failed == 0 and [u["status"] for u in report.units] == ["done", "done"]
    by = {(m.metric, m.tags.get("fake_class"), m.tags.get("mag_bin")): m
          for m in report.measurements}
    # Fakes of 20-22 mag are far above the detection limit, 24-26 mostly below it.
    bright = by[("apqa.completeness.fractionInMagBin", "all", "20-22")].value
    faint = by[("apqa.completeness.fractionInMagBin", "all", "24-26")].value
    assert 0.7 <= bright <= 1.0 and faint < 0.3
    m50 = by[("apqa.completeness.m50", "all", None)]
    assert 22.5 < m50.value < 24.5 and 0 < m50.uncertainty < 0.5
    n_fakes = by[("apqa.completeness.nFakes", "all", None)].value
    assert n_fakes == sum(u["n_fakes_drawn"] for u in report.units)

    store = MetricStore(str(root / "m.db"), create=False)
    assert store.resolve_run("latest").id == report.store_run_id
    assert store.count_measurements(report.store_run_id) == len(report.measurements)
    assert report.gate is not None
    assert len([c for c in report.gate.checks if c.kind == "threshold"]) >= len(
        load_thresholds(THRESHOLDS)) - 2

    with Apdb.open(report.apdb) as apdb:
        counts = apdb.counts()
    assert counts["DiaSource"] == sum(u["n_dia_sources"] for u in report.units)
    alerts = sorted((report.out / "alerts").glob("*.avro"))
    assert [a.name for a in alerts] == ["alerts_410001_1.avro", "alerts_410002_1.avro"]
    info = json.loads(report.run_json.read_text())
    assert info["git_sha"] and info["units"][0]["peak_rss_bytes"] > 0
    assert set(info["stages"]) == {"units", "associate", "metrics", "store"}


def test_dask_local_cluster_gives_the_same_metrics(run, tmp_path):
    _, report = run
    dask = inject_and_run(RunOptions(out=tmp_path / "out", config=CONFIG,
                                     db=str(tmp_path / "m.db"), scheduler="local:2"))
    assert dask.scheduler == "local:2" and dask.n_failed == 0
    _assert_same_metrics(dask.measurements, report.measurements)


def test_dask_runs_units_in_time_order(tmp_path):
    """Units run in the plan's time order (association follows them in that order): on one
    worker, each detector's template first, then every unit in visit order, whichever
    detector's template finished first."""
    report = inject_and_run(RunOptions(out=tmp_path / "out", config=CONFIG, n_visits=2,
                                       n_detectors=2, db=str(tmp_path / "m.db"),
                                       scheduler="local:1"))
    assert report.n_failed == 0
    plan = [(u["visit"], u["detector"]) for u in report.units]
    assert plan == [(410001, 1), (410001, 2), (410002, 1), (410002, 2)]
    ran = sorted(report.units, key=lambda u: u["started"])
    assert [(u["visit"], u["detector"]) for u in ran] == plan
    assert max(t["finished"] for t in report.templates) <= ran[0]["started"]


def test_resume_skips_verified_units_and_reruns_corrupted_ones(run, tmp_path):
    _, report = run
    out = tmp_path / "out"
    shutil.copytree(report.out, out)
    damaged = unit_dir(out, 410002, 1) / "matched.parquet"
    damaged.write_bytes(damaged.read_bytes() + b"x")
    assert finished(unit_dir(out, 410001, 1)) and not finished(unit_dir(out, 410002, 1))
    again = inject_and_run(RunOptions(out=out, config=CONFIG, db=str(tmp_path / "m.db"),
                                      scheduler="process", resume=True))
    assert [u["status"] for u in again.units] == ["skipped", "done"]
    assert [t["status"] for t in again.templates] == ["skipped"]
    assert finished(unit_dir(out, 410002, 1))
    _assert_same_metrics(again.measurements, report.measurements)


def test_resume_reruns_units_made_from_other_inputs(run, tmp_path):
    """Resumed with another configuration, the finished units (valid checksums and all) are
    made again, not mixed with the new ones; resumed as they were, they are skipped."""
    _, report = run
    out = tmp_path / "out"
    shutil.copytree(report.out, out)
    changed = CONFIG.model_copy(update={"n_fakes": 80})
    again = inject_and_run(RunOptions(out=out, config=changed, db=str(tmp_path / "m.db"),
                                      scheduler="process", resume=True))
    assert [u["status"] for u in again.units] == ["done", "done"]
    assert [t["status"] for t in again.templates] == ["done"]
    assert all(u["n_fakes"] == 80 for u in again.units)
    same = inject_and_run(RunOptions(out=out, config=changed, db=str(tmp_path / "m.db"),
                                     scheduler="process", resume=True))
    assert [u["status"] for u in same.units] == ["skipped", "skipped"]


def _worker_settings(driver_pid: int) -> dict:
    import os

    import dask
    from distributed import get_worker

    worker = get_worker()
    return {"profile": dask.config.get("distributed.worker.profile.enabled"),
            "profiler_running": "profile" in worker.periodic_callbacks,
            "monitor_interval": worker.periodic_callbacks["monitor"].callback_time,
            # Forked from the fork server (not the driver's child), which was started to
            # import the pipeline before it forks (its command line names what it preloads).
            "forked": os.getppid() != driver_pid,
            "server_preloads_pipeline": "apqa.pipeline.run_units" in Path(
                f"/proc/{os.getppid()}/cmdline").read_text(errors="replace")}


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_local_cluster_workers_run_without_dashboard_monitoring(monkeypatch):
    """The LocalCluster apqa starts has no dashboard: its workers do not profile the units
    they run, and their system monitor samples every 5 s (Dask's default: 10 ms, 0.5 s).
    They are forked from a fork server that imported the pipeline before forking them."""
    import os

    from apqa.pipeline import run_exec

    seen = []
    # The real executor on a real LocalCluster, with a probe in place of the pipeline.
    monkeypatch.setattr(run_exec, "_on_dask", lambda client, plan, on_unit: seen.append(
        client.submit(_worker_settings, os.getpid(), pure=False).result()) or ([], []))
    run_exec.execute(None, "local:1", lambda record: None)
    assert seen == [{"profile": False, "profiler_running": False, "monitor_interval": 5000,
                     "forked": True, "server_preloads_pipeline": True}]


def test_a_unit_whose_outputs_cannot_be_associated_fails_alone(tmp_path):
    # Its DiaSource table was damaged after the unit finished: association fails for it
    # only, the unit is reported failed, and the next unit in time order is still taken.
    units = [(1, 1, 60000.1), (2, 1, 60000.2)]
    for visit, det, _ in units:
        unit_dir(tmp_path, visit, det).mkdir(parents=True)
        (unit_dir(tmp_path, visit, det) / "diaSources.parquet").write_bytes(b"not parquet")
    from apqa.pipeline.run_driver import RunAssociator

    records = [{"visit": v, "detector": d, "mjd": m, "status": "done"} for v, d, m in units]
    with RunAssociator(tmp_path, units, str(tmp_path / "apdb.sqlite"), CONFIG) as associator:
        for record in reversed(records):  # out of order: the second waits for the first
            associator.offer(record)
    assert [r["status"] for r in records] == ["failed", "failed"]
    for record in records:
        assert record["error"].startswith("association: ArrowInvalid")
        assert f"v{record['visit']}_d01/diaSources.parquet" in record["error"]
    assert associator.next == 2
