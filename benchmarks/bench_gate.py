"""Benchmark: a gate decision with 10,000 runs of history (issue 8: <= 1 s).

Fills a fresh SQLite file and a fresh PostgreSQL schema with 10,000 succeeded runs (alternating
main and feature branches), each with the ~190 measurements ``compute_metrics`` gives for 20,000
constructed fakes plus runtime numbers (values jittered per run), so ~1.9 million rows. Then
times ``evaluate_gate`` of the newest run against ``ci/thresholds.yaml`` and the
``latest-main`` baseline (which also reads the recent history for values without an
uncertainty): in-process (best of 3), and the whole ``apqa gate`` process with
``/usr/bin/time -v``. Baseline, in the same session: the same decision done naively, loading
every run's measurements into pandas and picking the latest main run there.

Run:  python benchmarks/bench_gate.py [--runs 10000] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from bench_simulate import timed_process  # noqa: E402
from metrics.synthetic import make_matched  # noqa: E402

from apqa.ci.gate import evaluate_gate  # noqa: E402
from apqa.ci.thresholds import load_thresholds  # noqa: E402
from apqa.metrics import compute_metrics  # noqa: E402
from apqa.store import MetricStore  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def template_measurements():
    return compute_metrics(matched=make_matched(20_000, seed=1),
                           diffim=[{"visit": 1, "detector": 1, "noise_ratio": 1.0}],
                           runtime={"total": {"wall": 20.0, "cpu": 30.0}}, n_exposures=1,
                           tags={"dataset": "hits-sim"}, n_boot=50)


def fill(store: MetricStore, n_runs: int) -> None:
    """Bulk-load the history (raw SQL: this is fixture building, not what is timed)."""
    template = template_measurements()
    rng = np.random.default_rng(0)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    runs = [(i + 1, "hits-sim", f"{i:040x}", "main" if i % 2 else "feature", "{}", "cfg",
             "bench", t0 + timedelta(minutes=i), t0 + timedelta(minutes=i, seconds=30),
             "succeeded") for i in range(n_runs)]
    cols = ("id, dataset, git_sha, git_branch, package_versions, config_hash, host, "
            "started_at, finished_at, status")
    values = np.array([m.value for m in template])
    with store.engine.begin() as conn:
        mark = "?" if store.is_sqlite else "%s"
        conn.exec_driver_sql(f"INSERT INTO runs ({cols}) VALUES ({', '.join([mark] * 10)})",
                             runs)
        tags = [json.dumps(m.tags, sort_keys=True) for m in template]
        for start in range(0, n_runs, 500):
            rows = []
            for run_id in range(start + 1, min(start + 500, n_runs) + 1):
                jitter = values * (1 + 0.002 * rng.standard_normal(len(values)))
                rows += [(run_id, m.metric, float(v), m.unit, m.uncertainty, t)
                         for m, v, t in zip(template, jitter, tags, strict=True)]
            if store.is_sqlite:
                conn.exec_driver_sql("INSERT INTO measurements (run_id, metric, value, unit, "
                                     "uncertainty, tags) VALUES (?, ?, ?, ?, ?, ?)", rows)
            else:
                raw = conn.connection.driver_connection
                with raw.cursor() as cur, cur.copy("COPY measurements (run_id, metric, value, "
                                                   "unit, uncertainty, tags) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
        if not store.is_sqlite:
            conn.exec_driver_sql("SELECT setval('runs_id_seq', (SELECT max(id) FROM runs))")
    print(f"  history: {n_runs} runs x {len(template)} measurements")


def naive_gate(store: MetricStore) -> float:
    """Load everything, then pick runs and compare in pandas."""
    start = time.perf_counter()
    runs = pd.read_sql("SELECT * FROM runs", store.engine)
    meas = pd.read_sql("SELECT * FROM measurements", store.engine)
    meas["tags"] = meas["tags"].astype(str)  # PostgreSQL returns dicts
    run = runs.sort_values("started_at").iloc[-1]
    main = runs[(runs.git_branch == "main") & (runs.id != run.id)].sort_values("started_at")
    a = meas[meas.run_id == run.id]
    b = meas[meas.run_id == main.iloc[-1].id]
    a.merge(b, on=["metric", "tags"])
    return time.perf_counter() - start


def bench(label: str, url: str, n_runs: int, thresholds: Path) -> None:
    store = MetricStore(url)
    start = time.perf_counter()
    fill(store, n_runs)
    print(f"  filled in {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        report = evaluate_gate(store, "latest", load_thresholds(thresholds),
                               baseline="latest-main")
        times.append(time.perf_counter() - start)
    apqa = str(Path(sys.executable).parent / "apqa")
    wall, rss = timed_process(["sh", "-c", f"{apqa} gate --db '{url}' --run latest "
                               f"--thresholds {thresholds} --baseline latest-main "
                               "> /dev/null; test $? -le 1"])
    naive = naive_gate(store)
    print(f"{label}: evaluate_gate best {min(times):.3f} s of 3 ({len(report.checks)} checks, "
          f"{report.regression_tested} values tested against run {report.baseline.id}); "
          f"whole `apqa gate` process {wall:.2f} s, {rss:.2f} GB; naive load-everything "
          f"{naive:.2f} s ({naive / min(times):.0f}x)")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    thresholds = ROOT / "ci" / "thresholds.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        bench("SQLite", f"sqlite:///{Path(tmp) / 'm.db'}", args.runs, thresholds)
    if args.skip_postgres:
        return
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    dsn = "host=127.0.0.1 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        bench("PostgreSQL", PG.format(schema=schema), args.runs, thresholds)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
