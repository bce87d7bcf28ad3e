"""Store round trips, transactions and failed runs on SQLite and the real PostgreSQL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import text

from apqa.errors import InputError
from apqa.metrics import Measurement
from apqa.store import MetricStore
from apqa.store.engine import resolve_url


def _measurements(n: int = 500) -> list[Measurement]:
    out = [Measurement("apqa.photometry.centroidOffset", 0.5 * i, "mas",
                       0.1 if i % 2 else None,
                       {"visit": str(i), "band": "g", "quote": 'a"b\\c\td,e'})
           for i in range(n)]
    out.append(Measurement("apqa.completeness.snr50", float("nan"), None, None,
                           {"fake_class": "hosted"}))
    out.append(Measurement("apqa.runtime.wallPerDetector", 0.5, "min", 0.01))
    return out


def test_round_trip(db_url):
    store = MetricStore(db_url)
    run_id = store.start_run("hits-sim", "cfg-1", git_sha="abc123", git_branch="main",
                             package_versions={"apqa": "0.1.0"}, host="ci-1")
    given = _measurements()
    assert store.add_measurements(run_id, given) == len(given)
    store.finish_run(run_id)
    info = store.resolve_run("latest")
    assert (info.id, info.dataset, info.git_sha, info.git_branch, info.host) == (
        run_id, "hits-sim", "abc123", "main", "ci-1")
    assert info.package_versions == {"apqa": "0.1.0"} and info.status == "succeeded"
    assert info.started_at.tzinfo is not None and info.finished_at >= info.started_at
    back = store.measurements(run_id)
    assert len(back) == len(given)
    for a, b in zip(given, back, strict=True):
        assert (a.metric, a.unit, a.uncertainty, a.tags) == (b.metric, b.unit, b.uncertainty,
                                                             b.tags)
        assert a.value == b.value or (math.isnan(a.value) and math.isnan(b.value))
    # A second store on the same database sees the same run (schema already at head).
    assert MetricStore(db_url, create=False).count_measurements(run_id) == len(given)


def test_failed_run_keeps_nothing(db_url):
    store = MetricStore(db_url)
    run_id = store.start_run("hits-sim", "cfg")
    store.add_measurements(run_id, _measurements(300))
    store.finish_run(run_id, "failed", "diff stage crashed")
    info = store.resolve_run(run_id)
    assert info.status == "failed" and info.message == "diff stage crashed"
    assert store.count_measurements(run_id) == 0
    with pytest.raises(InputError, match=f"run {run_id} is failed"):
        store.add_measurements(run_id, _measurements(1))
    with pytest.raises(InputError, match="no succeeded run"):
        store.resolve_run("latest")


def test_recording_context(db_url):
    store = MetricStore(db_url)
    with store.recording("hits-sim", "cfg") as run:
        run.add(_measurements(250))
        assert store.count_measurements(run.run_id) == 0  # written only at the end
    assert store.resolve_run(run.run_id).status == "succeeded"
    assert store.count_measurements(run.run_id) == 252
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), store.recording("hits-sim", "cfg") as run:
            run.add(_measurements(10))
            raise exc
        info = store.resolve_run(run.run_id)
        assert info.status == "failed" and info.message.startswith(type(exc).__name__)
        assert store.count_measurements(run.run_id) == 0


def _reject_large_values(store: MetricStore) -> None:
    """A real database-side failure in the middle of a bulk write."""
    with store.engine.begin() as conn:
        if store.is_sqlite:
            conn.execute(text("CREATE TRIGGER too_large BEFORE INSERT ON measurements "
                              "WHEN NEW.value > 1000 BEGIN SELECT RAISE(ABORT, 'too large'); "
                              "END"))
        else:
            conn.execute(text("ALTER TABLE measurements ADD CONSTRAINT too_large "
                              "CHECK (value <= 1000)"))


def test_database_error_mid_write_stores_nothing(db_url):
    store = MetricStore(db_url)
    _reject_large_values(store)
    batch = _measurements(3000)  # values 0..1499.5 mas: the row at 1000.5 fails mid-batch
    run_id = store.start_run("hits-sim", "cfg")
    with pytest.raises(Exception, match=r"too_large|too large"):
        store.add_measurements(run_id, batch)
    assert store.count_measurements(run_id) == 0
    assert store.resolve_run(run_id).status == "running"
    with pytest.raises(Exception, match=r"too_large|too large"), \
            store.recording("hits-sim", "cfg") as run:
        run.add(batch)
    assert store.resolve_run(run.run_id).status == "failed"
    assert store.count_measurements(run.run_id) == 0


def test_duplicate_measurements_are_refused(db_url):
    store = MetricStore(db_url)
    run_id = store.start_run("hits-sim", "cfg")
    m = Measurement("apqa.completeness.m50", 24.0, tags={"band": "g"})
    with pytest.raises(InputError, match=r"apqa.completeness.m50 with tags \{\"band\": \"g\"\} "
                                         "given twice"):
        store.add_measurements(run_id, [m, Measurement("apqa.completeness.m50", 24.1,
                                                      tags={"band": "g"})])
    assert store.count_measurements(run_id) == 0


SCRIPT = textwrap.dedent("""
    import sys, time
    from apqa.metrics import Measurement
    from apqa.store import MetricStore
    store = MetricStore(sys.argv[1])
    with store.recording("hits-sim", "cfg") as run:
        run.add([Measurement("apqa.runtime.wallPerDetector", 1.0)])
        print(run.run_id, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_process_marks_its_run_failed(db_url, signum):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, db_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_id = int(proc.stdout.readline())
        os.kill(proc.pid, signum)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    info = MetricStore(db_url).resolve_run(run_id)
    expected = "KeyboardInterrupt" if signum == signal.SIGINT else "RunInterrupted"
    assert info.status == "failed" and info.message.startswith(expected)
    assert MetricStore(db_url).count_measurements(run_id) == 0


def test_latest_and_run_lookup(tmp_path):
    store = MetricStore(tmp_path / "m.db")
    ids = []
    for branch in ("main", "feature", "main"):
        run_id = store.start_run("hits-sim", "cfg", git_sha="s", git_branch=branch)
        store.finish_run(run_id)
        ids.append(run_id)
        time.sleep(0.01)
    assert store.resolve_run("latest").id == ids[2]
    assert store.latest_run(branch="main", exclude=ids[2]).id == ids[0]
    assert store.latest_run(dataset="cosmos-sim") is None
    with pytest.raises(InputError, match="run 99 does not exist"):
        store.resolve_run(99)
    with pytest.raises(InputError, match="run 'newest': expected a run id or 'latest'"):
        store.resolve_run("newest")
    assert [r.id for r in store.runs(limit=2)] == [ids[2], ids[1]]


def test_urls_and_missing_databases(tmp_path, monkeypatch):
    monkeypatch.setenv("APQA_DB", str(tmp_path / "env.db"))
    assert resolve_url(None).database == str(tmp_path / "env.db")
    monkeypatch.delenv("APQA_DB")
    assert resolve_url(None).database.endswith(".local/share/apqa/metrics.db")
    assert resolve_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert resolve_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"
    with pytest.raises(InputError, match="driver 'mysql' is not supported"):
        resolve_url("mysql://u@h/db")
    with pytest.raises(InputError, match=r"--db: no metric database at .*absent.db"):
        MetricStore(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(InputError, match="cannot connect"):
        MetricStore("postgresql://postgres@127.0.0.1:1/test")
