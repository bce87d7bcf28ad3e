"""The Alert Production Database (APDB) on SQLite or PostgreSQL, in Rubin's ``apdb.yaml`` schema.

An :class:`Apdb` holds DiaObjects, DiaSources and DiaForcedSources. Each visit-detector is stored
in one transaction (:meth:`Apdb.store_visit`) that first removes what an earlier run of the same
visit-detector wrote, so a crash leaves nothing half written and re-processing is idempotent.

DiaObjects are versioned as in Rubin's APDB: each stored update is a new row whose
``validityStartMjdTai`` is the visit's midpoint and whose ``validityEndMjdTai`` stays null until a
later visit supersedes it. (Rubin stamps the processing time; apqa uses the visit midpoint so that
re-processing writes identical rows and region reads "as before visit V" are exact.)

Examples
--------
>>> apdb = Apdb.create("run/apdb.sqlite3")                        # doctest: +SKIP
>>> objects, sources = apdb.read_region([(150.0, 2.0, 0.2)])       # doctest: +SKIP
>>> apdb.store_visit(410001, 1, dia_sources, dia_objects, forced)  # doctest: +SKIP
>>> apdb.counts()["DiaSource"]                                     # doctest: +SKIP
2000
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from apqa.datamodel.apdb_schema import conform, empty_table, frame_from_rows, load_apdb_schema
from apqa.errors import InputError
from apqa.pipeline.apdb_region import (
    PIXELIZATION,
    angular_separation,
    cone_ranges,
    pixel_ids,
)
from apqa.pipeline.apdb_tables import (
    KEY_PIXELIZATION,
    KEY_SCHEMA_VERSION,
    PIXEL_COLUMN,
    ApdbError,
    build_metadata,
    display_url,
    make_engine,
    resolve_url,
)
from apqa.pipeline.apdb_write import bulk_insert

__all__ = ["Apdb", "ApdbError"]

Cone = tuple[float, float, float]
_CHUNK = 5000


def _chunks(values: Sequence[int]) -> Iterator[list[int]]:
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def _conform(frame: pd.DataFrame | None, name: str, source: str) -> pd.DataFrame:
    """``conform``, with None or an empty frame standing for an empty table."""
    if frame is None or len(frame) == 0:
        return empty_table(name)
    return conform(frame, name, source=source)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return "; ".join(line.strip() for line in str(orig).splitlines() if line.strip())


class Apdb:
    """An open APDB. Use :meth:`create` or :meth:`open`, not the constructor.

    ``db`` is a SQLite file path, ``sqlite:///PATH``, ``postgresql://...`` (psycopg 3) or
    ``postgresql+psycopg2://...``. On PostgreSQL the tables live in the connection's
    ``search_path`` schema (e.g. ``?options=-csearch_path%3Dmy_schema`` in the URL).
    """

    def __init__(self, engine: sa.Engine, label: str) -> None:
        self._engine = engine
        self._label = label
        # PEP 249's base exception of the driver (psycopg, psycopg2, sqlite3).
        dbapi = getattr(engine.dialect, "dbapi", None)
        self._driver_errors: tuple[type[Exception], ...] = (
            (dbapi.Error,) if dbapi is not None and hasattr(dbapi, "Error") else ())
        self._metadata = build_metadata()
        self._tables = self._metadata.tables

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, db: str | Path) -> Apdb:
        """Create the APDB tables (if absent) and record the schema version; returns it open.

        Creating over an existing APDB of the same schema version only opens it.
        """
        url = resolve_url(db)
        if url.get_backend_name() == "sqlite" and url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        apdb = cls(make_engine(url), display_url(url))
        with apdb._guard("create"):
            if sa.inspect(apdb._engine).has_table("metadata"):
                apdb._check_metadata()
                return apdb
            with apdb._engine.begin() as conn:
                apdb._metadata.create_all(conn)
                conn.execute(apdb._tables["metadata"].insert(), [
                    {"name": KEY_SCHEMA_VERSION, "value": load_apdb_schema().version},
                    {"name": KEY_PIXELIZATION, "value": PIXELIZATION},
                ])
        return apdb

    @classmethod
    def open(cls, db: str | Path) -> Apdb:
        """Open an existing APDB, checking its schema version and pixelization."""
        url = resolve_url(db)
        if url.get_backend_name() == "sqlite" and url.database and not Path(
                url.database).is_file():
            raise ApdbError(f"APDB {display_url(url)}: no such file; create it with "
                            f"`apqa apdb create --db {db}`")
        apdb = cls(make_engine(url), display_url(url))
        with apdb._guard("open"):
            apdb._check_metadata()
        return apdb

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()

    def __enter__(self) -> Apdb:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL (password hidden)."""
        return self._label

    @contextmanager
    def _guard(self, action: str, writing: bool = False) -> Iterator[None]:
        """Turn database failures into one-line :class:`ApdbError` messages."""
        after = " (rolled back: nothing written)" if writing else ""
        try:
            yield
        except DBAPIError as exc:
            if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError):
                raise ApdbError(f"APDB {self._label}: {action} failed{after}, database "
                                f"unreachable or refused the connection: {_one_line(exc)}"
                                ) from None
            raise ApdbError(f"APDB {self._label}: {action} failed{after}: {_one_line(exc)}"
                            ) from None
        except SQLAlchemyError as exc:
            raise ApdbError(f"APDB {self._label}: {action} failed{after}: {_one_line(exc)}"
                            ) from None
        except self._driver_errors as exc:  # the driver's own COPY path, not SQLAlchemy's
            raise ApdbError(f"APDB {self._label}: {action} failed{after}: {_one_line(exc)}"
                            ) from None

    def metadata(self) -> dict[str, str]:
        """The metadata table as a dict (``version:schema``, ``apqa:pixelization``)."""
        with self._guard("read metadata"), self._engine.connect() as conn:
            rows = conn.execute(sa.select(self._tables["metadata"])).all()
        return {name: value for name, value in rows}

    def _check_metadata(self) -> None:
        if not sa.inspect(self._engine).has_table("metadata"):
            raise ApdbError(f"APDB {self._label}: not an APDB (no metadata table); create one "
                            "with `apqa apdb create --db URL`")
        meta = self.metadata()
        ours = load_apdb_schema().version
        theirs = meta.get(KEY_SCHEMA_VERSION, "<none>")
        if theirs != ours:
            raise ApdbError(f"APDB {self._label}: schema version {theirs} in the database, but "
                            f"this apqa uses apdb.yaml version {ours}; use a new APDB or migrate")
        pixelization = meta.get(KEY_PIXELIZATION, "<none>")
        if pixelization != PIXELIZATION:
            raise ApdbError(f"APDB {self._label}: pixelization {pixelization} in the database, "
                            f"this apqa uses {PIXELIZATION}")

    @property
    def schema_version(self) -> str:
        """The apdb.yaml version recorded in the database."""
        return self.metadata()[KEY_SCHEMA_VERSION]

    # -- reading -------------------------------------------------------------------------------
    def _frame(self, conn: sa.Connection, stmts: sa.Select | list[sa.Select], name: str
               ) -> pd.DataFrame:
        """APDB table ``name`` from the rows of one or more statements."""
        stmts = stmts if isinstance(stmts, list) else [stmts]
        rows: list[tuple] = []
        names = [c.name for c in self._tables[name].columns]
        for stmt in stmts:
            result = conn.execute(stmt)
            names = list(result.keys())
            rows.extend(result.fetchall())
        return frame_from_rows(rows, names, name, source=f"APDB {self._label}")

    def read_region(self, cones: Cone | Sequence[Cone], before_mjd: float | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """DiaObjects inside the cones and every DiaSource of those objects.

        Parameters
        ----------
        cones
            One ``(ra, dec, radius)`` or a list of them, in degrees.
        before_mjd
            None for the current DiaObject versions and all their DiaSources; an MJD (TAI) for the
            state just before that time: object versions valid then (``validityEndMjdTai``
            null, as it was), sources observed earlier.
            Pass the visit's midpoint when (re-)processing a visit.

        Returns
        -------
        dia_objects, dia_sources
            Tables conforming to apdb.yaml's DiaObject and DiaSource.
        """
        objects = self.read_objects(cones, before_mjd)
        return objects, self.read_sources(objects["diaObjectId"], before_mjd)

    def read_objects(self, cones: Cone | Sequence[Cone], before_mjd: float | None = None
                     ) -> pd.DataFrame:
        """The DiaObjects of :meth:`read_region` without their DiaSources (read those with
        :meth:`read_sources` for the objects that need them, e.g. those a visit updates)."""
        if not len(cones):
            raise InputError("read_region: no cones given")
        if np.ndim(cones[0]) == 0:
            cones = [cones]  # type: ignore[list-item]
        if any(np.size(cone) != 3 for cone in cones):
            raise InputError(f"read_region: expected (ra, dec, radius) cones in degrees, got "
                             f"{cones!r}")
        cones = [tuple(float(v) for v in np.ravel(cone)) for cone in cones]
        obj = self._tables["DiaObject"]
        ranges = sorted({r for cone in cones for r in cone_ranges(*cone)})
        where = sa.or_(*[obj.c[PIXEL_COLUMN].between(lo, hi - 1) for lo, hi in ranges])
        if before_mjd is None:
            valid = obj.c.validityEndMjdTai.is_(None)
        else:
            valid = sa.and_(obj.c.validityStartMjdTai < before_mjd,
                            sa.or_(obj.c.validityEndMjdTai.is_(None),
                                   obj.c.validityEndMjdTai >= before_mjd))
        with self._guard("region read"), self._engine.connect() as conn:
            objects = self._frame(conn, sa.select(obj).where(where, valid), "DiaObject")
        inside = np.zeros(len(objects), bool)
        for ra, dec, radius in cones:
            inside |= angular_separation(objects["ra"].to_numpy(float),
                                         objects["dec"].to_numpy(float), ra, dec) <= radius
        objects = objects[inside].reset_index(drop=True)
        if before_mjd is not None:  # as they were then: not yet superseded
            objects["validityEndMjdTai"] = np.nan
        return objects

    def read_sources(self, dia_object_ids: Sequence[int] | pd.Series,
                     before_mjd: float | None = None) -> pd.DataFrame:
        """DiaSources of the given DiaObjects (observed before ``before_mjd`` if given)."""
        with self._guard("source read"), self._engine.connect() as conn:
            return self._by_object(conn, "DiaSource", pd.Series(dia_object_ids), before_mjd)

    def _by_object(self, conn: sa.Connection, name: str, ids: pd.Series,
                   before_mjd: float | None) -> pd.DataFrame:
        table = self._tables[name]
        stmts = []
        for chunk in _chunks(pd.unique(ids.to_numpy(np.int64)).tolist()):
            stmt = sa.select(table).where(table.c.diaObjectId.in_(chunk))
            if before_mjd is not None:
                stmt = stmt.where(table.c.midpointMjdTai < before_mjd)
            stmts.append(stmt)
        return self._frame(conn, stmts, name)

    def read_forced_sources(self, dia_object_ids: Sequence[int] | pd.Series,
                            before_mjd: float | None = None) -> pd.DataFrame:
        """DiaForcedSources of the given DiaObjects (observed before ``before_mjd`` if given)."""
        with self._guard("forced-source read"), self._engine.connect() as conn:
            return self._by_object(conn, "DiaForcedSource", pd.Series(dia_object_ids),
                                   before_mjd)

    def read_visit(self, visit: int, detector: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The DiaSources and DiaForcedSources stored for one visit-detector."""
        frames = []
        with self._guard("visit read"), self._engine.connect() as conn:
            for name in ("DiaSource", "DiaForcedSource"):
                table = self._tables[name]
                stmt = sa.select(table).where(table.c.visit == int(visit),
                                              table.c.detector == int(detector))
                frames.append(self._frame(conn, stmt, name))
        return frames[0], frames[1]

    def read_dia_objects(self) -> pd.DataFrame:
        """Every current DiaObject (latest versions), e.g. for run-level counts."""
        obj = self._tables["DiaObject"]
        with self._guard("DiaObject read"), self._engine.connect() as conn:
            return self._frame(conn, sa.select(obj).where(obj.c.validityEndMjdTai.is_(None)),
                               "DiaObject")

    def counts(self) -> dict[str, int]:
        """Rows per table, plus ``DiaObject (current)``: objects not superseded by a later version.
        """
        out = {}
        with self._guard("count"), self._engine.connect() as conn:
            for name, table in self._tables.items():
                out[name] = int(conn.execute(sa.select(sa.func.count()).select_from(table))
                                .scalar_one())
            obj = self._tables["DiaObject"]
            out["DiaObject (current)"] = int(conn.execute(
                sa.select(sa.func.count()).select_from(obj)
                .where(obj.c.validityEndMjdTai.is_(None))).scalar_one())
        return out

    # -- writing -------------------------------------------------------------------------------
    def store_visit(self, visit: int, detector: int, dia_sources: pd.DataFrame,
                    dia_objects: pd.DataFrame, forced_sources: pd.DataFrame | None = None
                    ) -> dict[str, int]:
        """Store one visit-detector in one transaction, replacing an earlier run of it.

        Parameters
        ----------
        visit, detector
            The visit-detector; every DiaSource and DiaForcedSource row must belong to it.
        dia_sources
            The visit-detector's DiaSources (diaObjectId set by association).
        dia_objects
            The DiaObjects this visit created or updated (``AssociationResult.dia_objects``); each
            becomes a new version valid from the visit midpoint, closing the previous version.
        forced_sources
            The visit-detector's DiaForcedSources (may be None or empty).

        Returns
        -------
        dict
            Rows written per table.
        """
        where = f"store_visit(visit={visit}, detector={detector})"
        sources = _conform(dia_sources, "DiaSource", f"{where} dia_sources")
        objects = _conform(dia_objects, "DiaObject", f"{where} dia_objects")
        forced = _conform(forced_sources, "DiaForcedSource", f"{where} forced_sources")
        for name, frame in (("dia_sources", sources), ("forced_sources", forced)):
            wrong = (frame["visit"] != visit) | (frame["detector"] != detector)
            if wrong.any():
                raise InputError(f"{where}: {int(wrong.sum())} {name} rows belong to another "
                                 "visit or detector (columns 'visit', 'detector')")
        times = pd.concat([sources["midpointMjdTai"], forced["midpointMjdTai"]]).unique()
        if len(times) > 1:
            raise InputError(f"{where}: rows have {len(times)} different midpointMjdTai values; "
                             "expected one per visit")
        if len(objects) and not len(times):
            raise InputError(f"{where}: dia_objects given without any DiaSource or "
                             "DiaForcedSource to date them (column 'midpointMjdTai')")
        if len(times):
            objects["validityStartMjdTai"] = float(times[0])
            objects["validityEndMjdTai"] = np.nan
        objects[PIXEL_COLUMN] = pixel_ids(objects["ra"], objects["dec"])
        sources[PIXEL_COLUMN] = pixel_ids(sources["ra"], sources["dec"])
        with self._guard(where, writing=True), self._engine.begin() as conn:
            touched = self._remove_visit(conn, int(visit), int(detector))
            obj = self._tables["DiaObject"]
            for chunk in _chunks(objects["diaObjectId"].tolist()):
                start = float(times[0])
                conn.execute(sa.update(obj).where(obj.c.diaObjectId.in_(chunk),
                                                  obj.c.validityEndMjdTai.is_(None))
                             .values(validityEndMjdTai=start))
                # An object updated twice at the same time (overlapping detectors): last wins.
                conn.execute(sa.delete(obj).where(obj.c.diaObjectId.in_(chunk),
                                                  obj.c.validityStartMjdTai == start))
            written = {"DiaObject": bulk_insert(conn, obj, objects),
                       "DiaSource": bulk_insert(conn, self._tables["DiaSource"], sources),
                       "DiaForcedSource": bulk_insert(conn, self._tables["DiaForcedSource"],
                                                      forced)}
            written["DiaObjectLast"] = self._refresh_last(
                conn, sorted(touched | set(objects["diaObjectId"].astype("int64").tolist())))
            return written

    def _refresh_last(self, conn: sa.Connection, ids: list[int]) -> int:
        """Rewrite the DiaObjectLast rows of these objects from their current DiaObject
        versions (Rubin's table of latest versions, read without the version filter)."""
        last, obj = self._tables["DiaObjectLast"], self._tables["DiaObject"]
        columns = [c.name for c in last.columns]
        written = 0
        for chunk in _chunks(ids):
            conn.execute(sa.delete(last).where(last.c.diaObjectId.in_(chunk)))
            conn.execute(sa.insert(last).from_select(
                columns, sa.select(*[obj.c[c] for c in columns]).where(
                    obj.c.diaObjectId.in_(chunk), obj.c.validityEndMjdTai.is_(None))))
            # rowcount of INSERT ... SELECT is not reported by every driver: count instead.
            written += int(conn.execute(sa.select(sa.func.count()).select_from(last).where(
                last.c.diaObjectId.in_(chunk))).scalar_one())
        return written

    def _remove_visit(self, conn: sa.Connection, visit: int, detector: int) -> set[int]:
        """Undo an earlier store of this visit-detector: its rows and its object versions.

        Returns the DiaObjects whose current version changed."""
        src = self._tables["DiaSource"]
        obj = self._tables["DiaObject"]
        old = conn.execute(sa.select(src.c.diaObjectId, src.c.midpointMjdTai)
                           .where(src.c.visit == visit, src.c.detector == detector)).all()
        ids: list[int] = []
        if old:
            start = float(old[0][1])
            ids = sorted({row[0] for row in old if row[0] is not None})
            for chunk in _chunks(ids):
                conn.execute(sa.delete(obj).where(obj.c.diaObjectId.in_(chunk),
                                                  obj.c.validityStartMjdTai == start))
                conn.execute(sa.update(obj).where(obj.c.diaObjectId.in_(chunk),
                                                  obj.c.validityEndMjdTai == start)
                             .values(validityEndMjdTai=None))
        for name in ("DiaSource", "DiaForcedSource"):
            table = self._tables[name]
            conn.execute(sa.delete(table).where(table.c.visit == visit,
                                                table.c.detector == detector))
        return set(ids)
