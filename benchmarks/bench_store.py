"""Benchmark: storing 100,000 measurements in one transaction (issue 8: <= 3 s on SQLite and on
PostgreSQL).

Times ``MetricStore.add_measurements`` for one run of 100,000 measurements (tags as in real runs)
on a SQLite file, on PostgreSQL with psycopg 3 (COPY) and with psycopg2 (COPY), each in a fresh
database or schema. Baseline, in the same session: the same rows through SQLAlchemy's ORM
(``session.add_all`` + commit), the straightforward way. PostgreSQL: 127.0.0.1:5432, user
postgres, database test.

Run:  python benchmarks/bench_store.py [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.orm import Session

from apqa.metrics import Measurement
from apqa.store import MetricStore
from apqa.store.models import MeasurementRow

PG = "postgresql{driver}://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def measurements(n: int) -> list[Measurement]:
    metrics = ["apqa.completeness.fractionInSnrBin", "apqa.photometry.psfFluxBias",
               "apqa.calibration.psfFwhm", "apqa.runtime.wall"]
    return [Measurement(metrics[i % 4], 0.001 * i, None, 0.01,
                        {"dataset": "hits-sim", "band": "g", "visit": str(410000 + i // 4),
                         "detector": "1"}) for i in range(n)]


def orm_baseline(store: MetricStore, run_id: int, ms: list[Measurement]) -> float:
    start = time.perf_counter()
    with Session(store.engine) as session:
        session.add_all([MeasurementRow(run_id=run_id, metric=m.metric, value=m.value,
                                        unit=m.unit, uncertainty=m.uncertainty, tags=m.tags)
                         for m in ms])
        session.commit()
    return time.perf_counter() - start


def bench(url: str, ms: list[Measurement]) -> tuple[float, float]:
    store = MetricStore(url)
    run_id = store.start_run("hits-sim", "bench")
    start = time.perf_counter()
    store.add_measurements(run_id, ms)
    ours = time.perf_counter() - start
    assert store.count_measurements(run_id) == len(ms)
    base_run = store.start_run("hits-sim", "bench-orm")
    baseline = orm_baseline(store, base_run, ms)
    store.close()
    return ours, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    start = time.perf_counter()
    ms = measurements(args.n)
    print(f"building {args.n} Measurement objects: {time.perf_counter() - start:.2f} s "
          f"(tags JSON {len(json.dumps(ms[0].tags))} bytes)")
    with tempfile.TemporaryDirectory() as tmp:
        targets = [("SQLite file", f"sqlite:///{Path(tmp) / 'm.db'}", None)]
        for driver, label in (("", "PostgreSQL, psycopg 3 COPY"),
                              ("+psycopg2", "PostgreSQL, psycopg2 COPY")):
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            targets.append((label, PG.format(driver=driver, schema=schema), schema))
        for label, url, schema in targets:
            if schema:
                with psycopg.connect("host=127.0.0.1 user=postgres dbname=test",
                                     autocommit=True) as conn:
                    conn.execute(f"CREATE SCHEMA {schema}")
            try:
                ours, baseline = bench(url, ms)
            finally:
                if schema:
                    with psycopg.connect("host=127.0.0.1 user=postgres dbname=test",
                                         autocommit=True) as conn:
                        conn.execute(f"DROP SCHEMA {schema} CASCADE")
            print(f"{label:28s} add_measurements {ours:5.2f} s   ORM baseline {baseline:5.2f} s"
                  f"   ({baseline / ours:.1f}x)")


if __name__ == "__main__":
    main()
