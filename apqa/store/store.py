"""The metric store: runs and measurements in SQLite or PostgreSQL.

Every write is one transaction. A run is ``running`` until it is finished ``succeeded`` or
``failed``; finishing it ``failed`` deletes whatever measurements it had stored in the same
transaction, so a failed run is never half-stored. :meth:`MetricStore.recording` does all of this
around a block of code, also on Ctrl-C and SIGTERM.

Examples
--------
>>> from apqa.metrics import Measurement
>>> store = MetricStore("sqlite://")  # in memory
>>> with store.recording("hits-sim", "cfg123") as run:
...     run.add([Measurement("apqa.runtime.wallPerDetector", 12.5)])
>>> store.resolve_run("latest").status
'succeeded'
>>> store.measurements(run.run_id)[0].value
12.5
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from sqlalchemy import Connection, delete, func, insert, select, update

from apqa.errors import InputError
from apqa.log import get_logger
from apqa.metrics.registry import Measurement
from apqa.store.engine import current_revision, head_revision, make_engine, resolve_url, upgrade
from apqa.store.models import MeasurementRow, Run
from apqa.store.provenance import git_info, host_name, installed_versions

log = get_logger(__name__)

STATUSES = ("running", "succeeded", "failed")
COPY_MIN_ROWS = 200  # below this, executemany is as fast as COPY
_COLUMNS = ("run_id", "metric", "value", "unit", "uncertainty", "tags")


class RunInterrupted(BaseException):
    """Raised inside :meth:`MetricStore.recording` when the process receives SIGTERM."""


@dataclass(frozen=True)
class RunInfo:
    """A stored run (read-only view)."""

    id: int
    dataset: str
    git_sha: str | None
    git_branch: str | None
    package_versions: dict
    config_hash: str
    host: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    message: str | None


def _utc(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes: everything is stored in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _info(row) -> RunInfo:
    return RunInfo(row.id, row.dataset, row.git_sha, row.git_branch, row.package_versions or {},
                   row.config_hash, row.host, _utc(row.started_at), _utc(row.finished_at),
                   row.status, row.message)


def _copy_field(value: object) -> str:
    """A field of PostgreSQL's COPY text format."""
    if value is None:
        return "\\N"
    if isinstance(value, float):
        return repr(value)
    return (str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class RunRecorder:
    """Collects a run's measurements; they are written when the ``recording`` block ends."""

    run_id: int
    measurements: list[Measurement] = field(default_factory=list)

    def add(self, measurements: Iterable[Measurement]) -> None:
        self.measurements.extend(measurements)


class MetricStore:
    """Runs and measurements in a SQLite file or a PostgreSQL database.

    Parameters
    ----------
    db
        A URL (``sqlite:///path``, ``postgresql://...`` for psycopg 3,
        ``postgresql+psycopg2://...``), a SQLite file path, or None for ``$APQA_DB`` or
        ``~/.local/share/apqa/metrics.db``.
    create
        Create a missing SQLite file and the schema of an empty database. With
        ``create=False`` a missing file is an error (read-only commands).
    """

    def __init__(self, db: str | os.PathLike | None = None, *, create: bool = True) -> None:
        self.url = resolve_url(db)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        path = self.url.database if self.is_sqlite and self.url.database else None
        if path and path != ":memory:":
            if not Path(path).exists() and not create:
                raise InputError(f"--db: no metric database at {path}")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.url)
        try:
            revision = current_revision(self.engine)
        except Exception as exc:  # driver errors (refused connection, bad auth) become one line
            raise InputError(f"--db {self.display_url}: cannot connect: "
                             f"{str(exc).splitlines()[0]}") from None
        if revision is None and create:
            upgrade(self.engine)
        elif revision is None:
            raise InputError(f"--db {self.display_url}: no apqa metric schema; run "
                             "`apqa db upgrade --db URL`")
        elif revision != head_revision():
            raise InputError(f"--db {self.display_url}: schema revision {revision} is not the "
                             f"current {head_revision()}; run `apqa db upgrade --db URL`")

    @property
    def display_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # --- runs ---------------------------------------------------------------------------------
    def start_run(self, dataset: str, config_hash: str, *, git_sha: str | None = None,
                  git_branch: str | None = None, package_versions: dict | None = None,
                  host: str | None = None) -> int:
        """Insert a ``running`` run; missing provenance is filled from this process."""
        if git_sha is None and git_branch is None:
            git_sha, git_branch = git_info()
        row = {"dataset": dataset, "config_hash": config_hash, "git_sha": git_sha,
               "git_branch": git_branch, "status": "running", "pid": os.getpid(),
               "package_versions": package_versions if package_versions is not None
               else installed_versions(), "host": host or host_name(),
               "started_at": datetime.now(UTC)}
        with self.engine.begin() as conn:
            return int(conn.execute(insert(Run).values(**row).returning(Run.id)).scalar_one())

    def _require_running(self, conn: Connection, run_id: int) -> None:
        status = conn.execute(select(Run.status).where(Run.id == run_id)).scalar_one_or_none()
        if status is None:
            raise InputError(f"run {run_id} does not exist in {self.display_url}")
        if status != "running":
            raise InputError(f"run {run_id} is {status}: measurements can only be added to a "
                             "running run")

    def add_measurements(self, run_id: int, measurements: Sequence[Measurement]) -> int:
        """Store measurements of a running run in one transaction; returns how many."""
        with self.engine.begin() as conn:
            self._require_running(conn, run_id)
            self._insert(conn, run_id, measurements)
        return len(measurements)

    def finish_run(self, run_id: int, status: str = "succeeded", message: str | None = None
                   ) -> None:
        """Mark a run finished; ``failed`` also deletes its measurements (same transaction)."""
        if status not in ("succeeded", "failed"):
            raise InputError(f"run status must be 'succeeded' or 'failed', got {status!r}")
        with self.engine.begin() as conn:
            self._finish(conn, run_id, status, message)

    def _finish(self, conn: Connection, run_id: int, status: str, message: str | None) -> None:
        if status == "failed":
            conn.execute(delete(MeasurementRow).where(MeasurementRow.run_id == run_id))
        conn.execute(update(Run).where(Run.id == run_id).values(
            status=status, message=message, finished_at=datetime.now(UTC)))

    @contextlib.contextmanager
    def recording(self, dataset: str, config_hash: str, **provenance) -> Iterator[RunRecorder]:
        """Record a run around a block: measurements added to the recorder are stored with the
        ``succeeded`` status in one transaction at the end; any exception, Ctrl-C or SIGTERM
        marks the run ``failed`` with nothing stored, and is re-raised."""
        recorder = RunRecorder(self.start_run(dataset, config_hash, **provenance))
        with _sigterm_raises():
            try:
                yield recorder
                with self.engine.begin() as conn:
                    self._require_running(conn, recorder.run_id)
                    self._insert(conn, recorder.run_id, recorder.measurements)
                    self._finish(conn, recorder.run_id, "succeeded", None)
            except BaseException as exc:
                self.finish_run(recorder.run_id, "failed", f"{type(exc).__name__}: {exc}")
                raise

    # --- bulk insert ----------------------------------------------------------------------------
    def _insert(self, conn: Connection, run_id: int, measurements: Sequence[Measurement]) -> None:
        rows = [(run_id, m.metric, _finite(m.value), m.unit, m.uncertainty,
                 json.dumps(m.tags, sort_keys=True)) for m in measurements]
        if not rows:
            return
        keys = {(r[1], r[5]) for r in rows}
        if len(keys) < len(rows):
            seen: set = set()
            dup = next(r for r in rows if (r[1], r[5]) in seen or seen.add((r[1], r[5])))
            raise InputError(f"run {run_id}: measurement {dup[1]} with tags {dup[5]} given "
                             "twice; each metric and tag set is measured once per run")
        driver = self.url.get_driver_name()
        if driver == "psycopg" and len(rows) >= COPY_MIN_ROWS:
            raw = conn.connection.driver_connection
            with raw.cursor() as cur, cur.copy(
                    f"COPY measurements ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        elif driver == "psycopg2" and len(rows) >= COPY_MIN_ROWS:
            buffer = io.StringIO("".join("\t".join(map(_copy_field, row)) + "\n" for row in rows))
            raw = conn.connection.driver_connection
            with raw.cursor() as cur:
                cur.copy_expert(f"COPY measurements ({', '.join(_COLUMNS)}) FROM STDIN", buffer)
        else:
            marks = ", ".join(["?" if self.is_sqlite else "%s"] * len(_COLUMNS))
            conn.exec_driver_sql(
                f"INSERT INTO measurements ({', '.join(_COLUMNS)}) VALUES ({marks})", rows)

    # --- reading --------------------------------------------------------------------------------
    def resolve_run(self, ref: str | int) -> RunInfo:
        """A run by id, or ``latest`` (the most recent succeeded run)."""
        with self.engine.connect() as conn:
            if str(ref) == "latest":
                row = conn.execute(select(Run).where(Run.status == "succeeded")
                                   .order_by(Run.started_at.desc(), Run.id.desc())
                                   .limit(1)).first()
                if row is None:
                    raise InputError(f"--run latest: no succeeded run in {self.display_url}")
                return _info(row)
            try:
                run_id = int(ref)
            except ValueError:
                raise InputError(f"run {ref!r}: expected a run id or 'latest'") from None
            row = conn.execute(select(Run).where(Run.id == run_id)).first()
        if row is None:
            raise InputError(f"run {run_id} does not exist in {self.display_url}")
        return _info(row)

    def latest_run(self, *, dataset: str | None = None, branch: str | None = None,
                   before: datetime | None = None, exclude: int | None = None
                   ) -> RunInfo | None:
        """The most recent succeeded run matching the filters (None if there is none)."""
        query = select(Run).where(Run.status == "succeeded")
        if dataset is not None:
            query = query.where(Run.dataset == dataset)
        if branch is not None:
            query = query.where(Run.git_branch == branch)
        if before is not None:
            query = query.where(Run.started_at <= before)
        if exclude is not None:
            query = query.where(Run.id != exclude)
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(Run.started_at.desc(), Run.id.desc())
                               .limit(1)).first()
        return None if row is None else _info(row)

    def runs(self, *, dataset: str | None = None, status: str | None = None,
             limit: int | None = 50) -> list[RunInfo]:
        """Runs, newest first."""
        query = select(Run)
        if dataset is not None:
            query = query.where(Run.dataset == dataset)
        if status is not None:
            query = query.where(Run.status == status)
        query = query.order_by(Run.started_at.desc(), Run.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_info(r) for r in conn.execute(query)]

    def count_measurements(self, run_id: int) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(MeasurementRow)
                                    .where(MeasurementRow.run_id == run_id)).scalar_one())

    def measurement_frame(self, run_ids: Sequence[int], metrics: Sequence[str] | None = None
                          ) -> pd.DataFrame:
        """Measurements of runs as a DataFrame (run_id, metric, value, unit, uncertainty,
        tags as dicts); NULL values come back as NaN."""
        query = select(MeasurementRow.run_id, MeasurementRow.metric, MeasurementRow.value,
                       MeasurementRow.unit, MeasurementRow.uncertainty, MeasurementRow.tags
                       ).where(MeasurementRow.run_id.in_(list(run_ids)))
        if metrics is not None:
            query = query.where(MeasurementRow.metric.in_(list(metrics)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(MeasurementRow.id)).all()
        frame = pd.DataFrame(rows, columns=list(_COLUMNS))
        frame["value"] = frame["value"].astype(float)
        frame["uncertainty"] = frame["uncertainty"].astype(float)
        return frame

    def measurements(self, run_id: int) -> list[Measurement]:
        """A run's measurements as :class:`Measurement` objects."""
        frame = self.measurement_frame([run_id])
        return [Measurement(r.metric, r.value, r.unit,
                            None if math.isnan(r.uncertainty) else r.uncertainty, r.tags)
                for r in frame.itertuples()]

    def history(self, *, dataset: str, branch: str | None, exclude: int, limit: int = 20
                ) -> pd.DataFrame:
        """Measurements of the ``limit`` most recent succeeded runs of a dataset (and branch)."""
        query = select(Run.id).where(Run.status == "succeeded", Run.dataset == dataset,
                                     Run.id != exclude)
        if branch is not None:
            query = query.where(Run.git_branch == branch)
        with self.engine.connect() as conn:
            ids = conn.execute(query.order_by(Run.started_at.desc()).limit(limit)).scalars()
            ids = list(ids)
        return self.measurement_frame(ids)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise RunInterrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
