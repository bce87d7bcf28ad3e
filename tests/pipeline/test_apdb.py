"""The APDB on SQLite and on the real PostgreSQL: round trips, idempotence, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from apqa.datamodel.apdb_schema import conform, empty_table, load_apdb_schema
from apqa.errors import InputError
from apqa.pipeline.apdb import Apdb, ApdbError
from apqa.pipeline.apdb_region import cone_ranges, pixel_ids
from apqa.pipeline.associate import associate

PG = "postgresql://postgres@127.0.0.1:5432/test"
RA0, DEC0 = 150.0, 2.0


@pytest.fixture
def pg_schema():
    """A fresh schema on the real PostgreSQL server, dropped after the test."""
    name = f"apqa_apdb_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    yield name
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def pg_url(schema: str, driver: str = "postgresql") -> str:
    return f"{driver}://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+psycopg2"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "run" / "apdb.sqlite3")
    return pg_url(request.getfixturevalue("pg_schema"), request.param)


def _fill(table: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Random values in every column of an APDB table, with some nulls where allowed."""
    n = len(table)
    for col in load_apdb_schema()[_name(table)].columns:
        kind = col.dtype
        if kind.startswith("float"):
            values = rng.normal(100.0, 30.0, n).astype(kind)
            if col.nullable:
                values[rng.random(n) < 0.2] = np.nan
        elif kind.lower().startswith("int"):
            values = pd.array(rng.integers(0, 30000, n), dtype=kind)
            if col.nullable:
                values[rng.random(n) < 0.2] = pd.NA
        elif kind in ("bool", "boolean"):
            values = pd.array(rng.random(n) < 0.5, dtype=kind)
            if col.nullable:
                values[rng.random(n) < 0.2] = pd.NA
        else:
            values = pd.Series(rng.choice(["g", "r", None], n), dtype=object)
        table[col.name] = values
    return table


def _name(table: pd.DataFrame) -> str:
    return {103: "DiaSource", 83: "DiaObject", 14: "DiaForcedSource"}[table.shape[1]]


def visit_tables(visit: int, detector: int, n: int, mjd: float, seed: int,
                 object_ids: np.ndarray | None = None):
    """(dia_sources, dia_objects, forced_sources) of one visit-detector around (RA0, DEC0)."""
    rng = np.random.default_rng(seed)
    src = _fill(empty_table("DiaSource", n), rng)
    src["diaSourceId"] = visit * 100_000_000 + detector * 100_000 + np.arange(n)
    src["visit"], src["detector"], src["midpointMjdTai"] = visit, detector, mjd
    src["ra"] = RA0 + rng.uniform(-0.1, 0.1, n)
    src["dec"] = DEC0 + rng.uniform(-0.1, 0.1, n)
    src["reliabilityVersion"] = "rb-1.0"
    # Values association relies on: not solar-system, sane errors, not rejected by flags.
    src["ssObjectId"] = pd.NA
    src["raErr"] = src["decErr"] = 0.1 / 3600
    src["pixelFlags_nodataCenter"] = src["pixelFlags_offimage"] = False
    ids = src["diaSourceId"].to_numpy() if object_ids is None else object_ids
    src["diaObjectId"] = pd.array(ids, dtype="Int64")
    obj = _fill(empty_table("DiaObject", n), rng)
    obj["diaObjectId"] = ids
    obj["ra"], obj["dec"] = src["ra"], src["dec"]
    forced = _fill(empty_table("DiaForcedSource", n), rng)
    forced["diaForcedSourceId"] = src["diaSourceId"]
    forced["diaObjectId"] = ids
    forced["visit"], forced["detector"], forced["midpointMjdTai"] = visit, detector, mjd
    forced["ra"], forced["dec"] = src["ra"], src["dec"]
    return (conform(src, "DiaSource"), conform(obj, "DiaObject"),
            conform(forced, "DiaForcedSource"))


def _sorted(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame.sort_values(key).reset_index(drop=True)


def test_round_trip_and_region_read(db_url):
    src, obj, forced = visit_tables(410001, 3, 500, 60000.25, seed=1)
    with Apdb.create(db_url) as apdb:
        assert apdb.schema_version == load_apdb_schema().version
        written = apdb.store_visit(410001, 3, src, obj, forced)
        assert written == {"DiaObject": 500, "DiaSource": 500, "DiaForcedSource": 500,
                           "DiaObjectLast": 500}
        cones = [(RA0 + 0.03, DEC0, 0.04), (RA0 - 0.05, DEC0 + 0.05, 0.02)]
        objects, sources = apdb.read_region(cones)
        forced_back = apdb.read_forced_sources(objects["diaObjectId"])
        visit_sources, visit_forced = apdb.read_visit(410001, 3)
        counts = apdb.counts()
    inside = np.zeros(len(obj), bool)
    for ra, dec, radius in cones:
        sep = np.degrees(np.arccos(np.clip(
            np.sin(np.radians(dec)) * np.sin(np.radians(obj["dec"]))
            + np.cos(np.radians(dec)) * np.cos(np.radians(obj["dec"]))
            * np.cos(np.radians(obj["ra"] - ra)), -1, 1)))
        inside |= sep <= radius
    assert 20 < inside.sum() < 200
    assert set(objects["diaObjectId"]) == set(obj["diaObjectId"][inside])
    expected_obj = obj[inside].copy()
    expected_obj["validityStartMjdTai"] = 60000.25  # stored versions start at the visit
    expected_obj["validityEndMjdTai"] = np.nan
    pd.testing.assert_frame_equal(_sorted(objects, "diaObjectId"),
                                  _sorted(expected_obj, "diaObjectId"))
    pd.testing.assert_frame_equal(_sorted(sources, "diaSourceId"),
                                  _sorted(src[inside], "diaSourceId"))
    pd.testing.assert_frame_equal(_sorted(forced_back, "diaForcedSourceId"),
                                  _sorted(forced[inside], "diaForcedSourceId"))
    pd.testing.assert_frame_equal(_sorted(visit_sources, "diaSourceId"), src)
    pd.testing.assert_frame_equal(_sorted(visit_forced, "diaForcedSourceId"), forced)
    assert counts["DiaSource"] == 500 and counts["DiaObject (current)"] == 500
    assert counts["metadata"] == 2 and counts["SSObject"] == 0


def test_reprocessing_a_visit_replaces_its_rows(db_url):
    # Visit 1 creates objects; visit 2 updates half of them and creates new ones.
    src1, obj1, forced1 = visit_tables(1, 1, 200, 60000.0, seed=2)
    with Apdb.create(db_url) as apdb:
        apdb.store_visit(1, 1, src1, obj1, forced1)
        before, history = apdb.read_region((RA0, DEC0, 0.5), before_mjd=60001.0)
        src2 = src1.iloc[:100].copy()
        src2["diaSourceId"] += 100_000_000
        src2["visit"], src2["midpointMjdTai"] = 2, 60001.0
        src2["diaObjectId"] = pd.NA
        extra = visit_tables(2, 1, 50, 60001.0, seed=3)[0]
        extra["diaSourceId"] += 1000
        src2 = pd.concat([src2, extra], ignore_index=True)
        result = associate(src2, before, history=history)
        assert result.counts["numUpdatedDiaObjects"] == 100
        apdb.store_visit(2, 1, result.dia_sources, result.dia_objects)
        first = _dump(apdb)
        # Re-processing visit 2 from the state before it gives the same rows.
        again_objects, again_history = apdb.read_region((RA0, DEC0, 0.5), before_mjd=60001.0)
        pd.testing.assert_frame_equal(_sorted(again_objects, "diaObjectId"),
                                      _sorted(before, "diaObjectId"))
        pd.testing.assert_frame_equal(_sorted(again_history, "diaSourceId"),
                                      _sorted(history, "diaSourceId"))
        rerun = associate(src2, again_objects, history=again_history)
        apdb.store_visit(2, 1, rerun.dia_sources, rerun.dia_objects)
        assert _dump(apdb) == first
        # A different second run of visit 2 (fewer sources) leaves no trace of the first.
        smaller = associate(src2.iloc[:30], again_objects, history=again_history)
        apdb.store_visit(2, 1, smaller.dia_sources, smaller.dia_objects)
        counts = apdb.counts()
        current, sources = apdb.read_region((RA0, DEC0, 0.5))
        everything = apdb.read_dia_objects()
        with apdb._engine.connect() as conn:
            last = pd.read_sql(sa.text('SELECT * FROM "DiaObjectLast"'), conn)
    assert counts["DiaSource"] == 230
    # DiaObjectLast holds exactly the current versions, also after the re-runs were undone.
    assert counts["DiaObjectLast"] == 200
    merged = last.merge(current, on="diaObjectId", suffixes=("", "_current"))
    assert len(merged) == 200
    assert (merged["nDiaSources"] == merged["nDiaSources_current"]).all()
    assert np.allclose(merged["ra"], merged["ra_current"])
    assert np.allclose(merged["validityStartMjdTai"], merged["validityStartMjdTai_current"])
    pd.testing.assert_frame_equal(_sorted(everything, "diaObjectId"),
                                  _sorted(current, "diaObjectId"))
    assert counts["DiaObject"] == 200 + 30 and counts["DiaObject (current)"] == 200
    assert (current["nDiaSources"] == 2).sum() == 30
    assert current["validityEndMjdTai"].isna().all()
    assert len(sources) == 230


def _dump(apdb: Apdb) -> dict:
    """Every row of the three catalogs, as sorted tuples (for exact comparisons)."""
    engine = apdb._engine
    out = {}
    with engine.connect() as conn:
        for name in ("DiaObject", "DiaObjectLast", "DiaSource", "DiaForcedSource"):
            rows = conn.execute(sa.text(f'SELECT * FROM "{name}"')).all()
            out[name] = sorted(tuple(str(v) for v in row) for row in rows)
    return out


def test_store_rejects_rows_of_other_visits(tmp_path):
    src, obj, forced = visit_tables(5, 1, 10, 60000.0, seed=4)
    with Apdb.create(tmp_path / "a.db") as apdb:
        with pytest.raises(InputError, match=r"2 dia_sources rows belong to another visit"):
            bad = src.copy()
            bad.loc[:1, "visit"] = 6
            apdb.store_visit(5, 1, bad, obj, forced)
        with pytest.raises(InputError, match="'ra' is NOT NULL but has 1 missing"):
            bad = src.copy()
            bad.loc[3, "ra"] = np.nan
            apdb.store_visit(5, 1, bad, obj, forced)
        assert apdb.counts()["DiaSource"] == 0


def test_strings_longer_than_their_column_are_refused_on_every_backend(db_url):
    """SQLite would store a reliabilityVersion of 15 characters, PostgreSQL refuses it
    (varchar(7) in apdb.yaml): conform refuses it on both, naming the column and the limit;
    the version apqa's own reliability model writes fits."""
    from apqa.pipeline.reliability import RELIABILITY_VERSION

    src, obj, forced = visit_tables(5, 1, 10, 60000.0, seed=4)
    with Apdb.create(db_url) as apdb:
        bad = src.copy()
        bad["reliabilityVersion"] = "apqa-logistic-1"
        with pytest.raises(InputError, match=r"'reliabilityVersion' holds at most 7 characters, "
                                             r"got 'apqa-logistic-1' \(15\)"):
            apdb.store_visit(5, 1, bad, obj, forced)
        assert apdb.counts()["DiaSource"] == 0
        good = src.copy()
        good["reliabilityVersion"] = RELIABILITY_VERSION
        apdb.store_visit(5, 1, good, obj, forced)
        assert apdb.counts()["DiaSource"] == len(src)


def test_schema_version_mismatch_names_both_versions(db_url):
    Apdb.create(db_url).close()
    with Apdb.open(db_url) as apdb, apdb._engine.begin() as conn:
        conn.execute(sa.text("UPDATE metadata SET value = '9.1.0' WHERE name = 'version:schema'"))
    ours = load_apdb_schema().version
    with pytest.raises(ApdbError, match=rf"schema version 9\.1\.0 in the database, but this apqa "
                                        rf"uses apdb\.yaml version {ours}"):
        Apdb.open(db_url)
    with pytest.raises(ApdbError, match=r"schema version 9\.1\.0"):
        Apdb.create(db_url)


def test_unreachable_database_and_missing_apdb(tmp_path, pg_schema):
    with pytest.raises(ApdbError, match=r"database unreachable or refused the connection: "
                                        r".*Connection refused"):
        Apdb.open("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(ApdbError, match=r"no such file; create it with `apqa apdb create"):
        Apdb.open(tmp_path / "missing.db")
    with pytest.raises(ApdbError, match=r"not an APDB \(no metadata table\)"):
        Apdb.open(pg_url(pg_schema))
    with pytest.raises(InputError, match="driver 'mysql' is not supported"):
        Apdb.open("mysql://localhost/apdb")


_WRITER = """
import sys, time
import pandas as pd
import apqa.pipeline.apdb as apdb_module
from apqa.pipeline.apdb_write import bulk_insert

def stalled(conn, table, frame):
    n = bulk_insert(conn, table, frame)
    if table.name == "DiaSource":
        print("DiaSource rows inserted, transaction open", flush=True)
        time.sleep(120)
    return n

apdb_module.bulk_insert = stalled
src, obj, forced = pd.read_pickle(sys.argv[2])
apdb_module.Apdb.open(sys.argv[1]).store_visit(2, 1, src, obj, forced)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_writer_leaves_no_rows(backend, tmp_path, request):
    url = (str(tmp_path / "apdb.db") if backend == "sqlite"
           else pg_url(request.getfixturevalue("pg_schema")))
    first = visit_tables(1, 1, 100, 60000.0, seed=5)
    second = visit_tables(2, 1, 300, 60001.0, seed=6)
    with Apdb.create(url) as apdb:
        apdb.store_visit(1, 1, *first)
    data = tmp_path / "visit2.pkl"
    pd.to_pickle(second, data)
    child = subprocess.Popen([sys.executable, "-c", _WRITER, url, str(data)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("DiaSource rows inserted")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    with Apdb.open(url) as apdb:
        counts = apdb.counts()
        assert counts["DiaSource"] == 100 and counts["DiaObject"] == 100
        assert len(apdb.read_visit(2, 1)[0]) == 0
        # The killed visit can be stored again.
        apdb.store_visit(2, 1, *second)
        assert apdb.counts()["DiaSource"] == 400


def test_pixel_ranges_cover_the_cone_across_ra_zero():
    rng = np.random.default_rng(7)
    ra = rng.uniform(-0.5, 0.5, 4000) % 360.0
    dec = rng.uniform(-0.5, 0.5, 4000)
    ranges = cone_ranges(0.0, 0.0, 0.15)
    ids = pixel_ids(ra, dec)
    covered = np.zeros(ids.size, bool)
    for lo, hi in ranges:
        covered |= (ids >= lo) & (ids < hi)
    near = np.hypot(np.where(ra > 180, ra - 360, ra), dec) < 0.149
    assert covered[near].all()
    # A cover of the 0.07 deg^2 cone, not much more (the sampled box is 1 deg^2).
    assert covered.mean() < 0.25


def test_region_read_across_ra_zero(tmp_path):
    src, obj, forced = visit_tables(3, 1, 300, 60000.0, seed=8)
    obj["ra"] = (obj["ra"] - RA0) % 360.0
    src["ra"] = obj["ra"]
    with Apdb.create(tmp_path / "a.db") as apdb:
        apdb.store_visit(3, 1, src, obj, forced)
        objects, sources = apdb.read_region((0.0, DEC0, 0.08))
    dra = np.where(obj["ra"] > 180, obj["ra"] - 360, obj["ra"]) * np.cos(np.radians(DEC0))
    expected = np.hypot(dra, obj["dec"] - DEC0) < 0.08
    assert set(objects["diaObjectId"]) == set(obj["diaObjectId"][expected])
    assert set(sources["diaSourceId"]) == set(src["diaSourceId"][expected])


def test_connection_lost_mid_visit_is_a_clear_error(pg_schema, monkeypatch):
    # The server ends the writer's session after its DiaSource rows went in.
    url = pg_url(pg_schema)
    import apqa.pipeline.apdb as apdb_module

    real_insert = apdb_module.bulk_insert

    def insert_then_lose_connection(conn, table, frame):
        n = real_insert(conn, table, frame)
        if table.name == "DiaSource":
            pid = conn.connection.driver_connection.info.backend_pid
            with psycopg.connect(PG, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return n

    with Apdb.create(url) as apdb:
        monkeypatch.setattr(apdb_module, "bulk_insert", insert_then_lose_connection)
        with pytest.raises(ApdbError, match=r"store_visit\(visit=4, detector=1\) failed \(rolled "
                                            r"back: nothing written\), database unreachable"):
            apdb.store_visit(4, 1, *visit_tables(4, 1, 50, 60000.0, seed=9))
        monkeypatch.setattr(apdb_module, "bulk_insert", real_insert)
        assert apdb.counts()["DiaSource"] == 0


def test_database_refusals_are_one_line_and_write_nothing(db_url):
    """A row the database itself refuses (a duplicate diaSourceId) fails the whole visit with
    one line, whichever path wrote it (SQLAlchemy on SQLite, the driver's COPY on PostgreSQL)."""
    src, obj, forced = visit_tables(5, 1, 10, 60000.0, seed=4)
    duplicate = src.copy()
    duplicate.loc[1, "diaSourceId"] = duplicate.loc[0, "diaSourceId"]
    with Apdb.create(db_url) as apdb:
        with pytest.raises(ApdbError, match=r"rolled back: nothing written") as refused:
            apdb.store_visit(5, 1, duplicate, obj, forced)
        assert "\n" not in str(refused.value)
        assert apdb.counts() == {**apdb.counts(), "DiaSource": 0, "DiaObject": 0}
