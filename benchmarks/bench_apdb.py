"""Benchmark: APDB write of one visit-detector, 2,000 DiaSources + 2,000 DiaForcedSources (and
the 2,000 DiaObject versions they update), issue 7 target <= 0.5 s on SQLite and PostgreSQL.

Each backend starts from an APDB that already holds 10 visit-detectors (so indexes and the
superseding of object versions do real work); ``store_visit`` is then timed on 5 further
visit-detectors and on re-processing one of them. Baseline in the same session: the same rows
through SQLAlchemy Core ``insert()`` with executemany (the usual idiom) inside one transaction.
PostgreSQL is the local server (127.0.0.1:5432, database test); each run uses a fresh schema.

Run:  python benchmarks/bench_apdb.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_associate import run_worker

PG = "postgresql://postgres@127.0.0.1:5432/test"
N = 2000


def visit(visit_id: int, seed: int):
    """(dia_sources, dia_objects, forced_sources) with every column filled like a real visit."""
    import pandas as pd

    from apqa.datamodel.apdb_schema import conform, empty_table, load_apdb_schema

    rng = np.random.default_rng(seed)
    tables = []
    for name in ("DiaSource", "DiaObject", "DiaForcedSource"):
        table = empty_table(name, N)
        for col in load_apdb_schema()[name].columns:
            if col.dtype.startswith("float"):
                table[col.name] = rng.normal(1e3, 1e2, N)
            elif col.dtype in ("bool", "boolean"):
                table[col.name] = rng.random(N) < 0.1
        tables.append(table)
    src, obj, forced = tables
    ids = np.arange(N) + 1  # the same objects every visit: each store supersedes versions
    src["diaSourceId"] = visit_id * 100_000 + np.arange(N)
    src["diaObjectId"] = pd.array(ids, dtype="Int64")
    src["ra"] = obj["ra"] = forced["ra"] = 150 + (ids % 50) * 0.004
    src["dec"] = obj["dec"] = forced["dec"] = 2 + (ids // 50) * 0.004
    src["band"], src["reliabilityVersion"] = "g", "rb-1.0"
    obj["diaObjectId"] = forced["diaObjectId"] = ids
    forced["diaForcedSourceId"] = src["diaSourceId"]
    for table in (src, forced):
        table["visit"], table["detector"] = visit_id, 1
        table["midpointMjdTai"] = 60000.0 + visit_id
    return (conform(src, "DiaSource"), conform(obj, "DiaObject"),
            conform(forced, "DiaForcedSource"))


def baseline_insert(apdb, tables) -> float:
    """Seconds for the same rows through SQLAlchemy Core executemany in one transaction."""
    from apqa.pipeline.apdb_region import pixel_ids
    from apqa.pipeline.apdb_write import column_values

    start = time.perf_counter()
    with apdb._engine.connect() as conn:
        transaction = conn.begin()
        for (name, table), frame in zip(
                [(n, apdb._tables[n]) for n in ("DiaSource", "DiaObject", "DiaForcedSource")],
                tables, strict=True):
            frame = frame.assign(pixelId=pixel_ids(frame["ra"], frame["dec"]))
            if name == "DiaObject":
                frame = frame.assign(validityStartMjdTai=1e9 + frame["diaObjectId"])
            cols = {c: column_values(frame[c]) for c in table.columns.keys()}
            rows = [dict(zip(cols, values, strict=True))
                    for values in zip(*cols.values(), strict=True)]
            conn.execute(table.insert(), rows)
        transaction.rollback()  # leave the APDB as it was
    return time.perf_counter() - start


def worker(backend: str) -> None:
    import psycopg

    from apqa.pipeline.apdb import Apdb

    schema = f"apqa_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "sqlite":
            url = str(Path(tmp) / "apdb.sqlite3")
        else:
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {schema}")
            url = f"{backend}://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
        try:
            with Apdb.create(url) as apdb:
                for v in range(1, 11):
                    apdb.store_visit(v, 1, *visit(v, v))
                times = []
                for v in range(11, 16):
                    tables = visit(v, v)
                    start = time.perf_counter()
                    apdb.store_visit(v, 1, *tables)
                    times.append(time.perf_counter() - start)
                start = time.perf_counter()
                apdb.store_visit(15, 1, *tables)  # re-processing replaces the rows
                rerun = time.perf_counter() - start
                base = baseline_insert(apdb, visit(99, 99))
                counts = apdb.counts()
        finally:
            if backend != "sqlite":
                with psycopg.connect(PG, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(json.dumps({"median_s": statistics.median(times), "max_s": max(times),
                      "rerun_s": rerun, "baseline_s": base, "rows": counts["DiaSource"]}))


def main() -> None:
    if "--worker" in sys.argv:
        worker(sys.argv[-1])
        return
    print(f"APDB store_visit: {N} DiaSources + {N} DiaForcedSources + {N} DiaObject versions "
          "(target <= 0.5 s)")
    for backend in ("sqlite", "postgresql", "postgresql+psycopg2"):
        numbers, wall, rss = run_worker(__file__, backend)
        print(f"  {backend:20s} median {numbers['median_s']:.3f} s, max {numbers['max_s']:.3f} s,"
              f" re-processing {numbers['rerun_s']:.3f} s; baseline Core executemany "
              f"{numbers['baseline_s']:.3f} s (x{numbers['baseline_s'] / numbers['median_s']:.1f})"
              f"; whole process (16 visits + baseline) {wall:.1f} s, peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
