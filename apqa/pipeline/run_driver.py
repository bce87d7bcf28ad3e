"""The serial part of ``apqa inject-and-run``, in the driver process: association, APDB and
alerts in visit order (while later units still run), then metrics, the metric store, the gate
and ``run.json``.

Association reads each finished unit's outputs (DiaSources, difference, science and warped
template images), so it works the same whichever process ran the unit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from apqa.datamodel import Exposure
from apqa.metrics.compute import compute_metrics
from apqa.metrics.registry import Measurement
from apqa.pipeline.alert_publish import AlertWriter
from apqa.pipeline.alerts import build_alerts
from apqa.pipeline.apdb import Apdb
from apqa.pipeline.associate import associate
from apqa.pipeline.forced import forced_photometry
from apqa.pipeline.run_layout import unit_dir
from apqa.pipeline.run_units import InjectRunConfig
from apqa.pipeline.sky_geometry import footprint_cone

OK = ("done", "skipped")


@dataclass
class AssociationTotals:
    """What association, the APDB and the alert writer did over the run."""

    per_visit: list[dict] = field(default_factory=list)
    dia_objects: pd.DataFrame | None = None
    n_alerts: int = 0
    alert_bytes: int = 0
    apdb_counts: dict[str, int] = field(default_factory=dict)


class RunAssociator:
    """Association, APDB and alerts of a run's units in time order, as the units finish.

    Units are offered in whatever order they finish; each is associated as soon as every unit
    before it in the plan (time order) has finished, so association overlaps the units still
    running instead of following them all. Use as a context manager; :attr:`totals` holds
    what was done.

    Examples
    --------
    >>> with RunAssociator(out, plan_units, "apdb.sqlite", config) as run:  # doctest: +SKIP
    ...     for record in finished_units:
    ...         run.offer(record)
    >>> run.totals.n_alerts  # doctest: +SKIP
    """

    def __init__(self, out: Path, units: list[tuple[int, int, float]], apdb_url: str,
                 config: InjectRunConfig) -> None:
        self.out = out
        self.config = config
        self.order = [(visit, det) for visit, det, _ in units]  # the plan's time order
        self.pending: dict[tuple[int, int], dict] = {}
        self.next = 0
        self.seconds = 0.0
        self.totals = AssociationTotals()
        self.writer = AlertWriter(out / "alerts")
        self.apdb_url = apdb_url
        self.apdb: Apdb | None = None

    def __enter__(self) -> RunAssociator:
        self.apdb = Apdb.create(self.apdb_url).__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.apdb is not None
        try:
            if exc_info[0] is None:
                self.totals.dia_objects = self.apdb.read_dia_objects()
                self.totals.apdb_counts = self.apdb.counts()
        finally:
            self.apdb.__exit__(*exc_info)

    def offer(self, record: dict) -> None:
        """Take a finished unit's record; associate every unit now ready, in time order."""
        self.pending[(record["visit"], record["detector"])] = record
        start = time.perf_counter()
        while self.next < len(self.order) and self.order[self.next] in self.pending:
            ready = self.pending.pop(self.order[self.next])
            if ready["status"] in OK:
                try:
                    self._associate(ready)
                except Exception as exc:  # its outputs unreadable, its ids not fitting...
                    # The unit fails alone, reported like any failed unit; later visits go on
                    # without it (what its transaction stored before the error stays).
                    ready["status"] = "failed"
                    ready["error"] = f"association: {type(exc).__name__}: {exc}"
            self.next += 1
        self.seconds += time.perf_counter() - start

    def _associate(self, rec: dict) -> None:
        assert self.apdb is not None
        apdb, config, totals = self.apdb, self.config, self.totals
        visit, det = rec["visit"], rec["detector"]
        folder = unit_dir(self.out, visit, det)
        dia = pd.read_parquet(folder / "diaSources.parquet")
        # Cut-outs and forced photometry use a few hundred stamps of each image. The units
        # write their images past the page cache, so the images are read whole the same way
        # (0.2 s for the three) rather than mapped (a disk read per stamp row: 0.8 s).
        difference, science, template = (
            Exposure.from_fits(folder / name, lazy=True, direct=True)
            for name in ("difference.fits", "science.fits", "template.fits"))
        objects = apdb.read_objects(footprint_cone(difference), before_mjd=rec["mjd"])
        # Earlier sources only of the objects this visit updates: they alone enter the
        # summaries and the alerts.
        result = associate(dia, objects, config.association,
                           history=lambda ids: apdb.read_sources(ids, before_mjd=rec["mjd"]))
        forced = forced_photometry(result.footprint_objects, difference, science, visit, det)
        forced_history = apdb.read_forced_sources(result.dia_objects["diaObjectId"],
                                                  before_mjd=rec["mjd"])
        apdb.store_visit(visit, det, result.dia_sources, result.dia_objects, forced)
        batch = build_alerts(result.dia_sources, result.dia_objects, difference, science,
                             template, history=result.history, forced_history=forced_history,
                             config=config.alerts)
        stats = self.writer.write(visit, det, batch)
        totals.n_alerts += stats.n_alerts
        totals.alert_bytes += stats.total_bytes
        totals.per_visit.append({"visit": visit, "detector": det,
                                 "numSciSources": rec["n_sci_sources"],
                                 **{k: result.counts[k] for k in (
                                     "numDiaSources", "numNewDiaObjects",
                                     "numUpdatedDiaObjects", "numUnassociatedDiaObjects")}})


def runtime_records(records: list[dict], stages: dict[str, float]) -> dict[str, dict]:
    """``{stage: {wall, cpu, peak_rss}}`` for the metrics: unit stages summed over the units
    that ran here, driver stages as timed, ``total`` = the units' wall and CPU time."""
    ran = [r for r in records if r["status"] == "done"]
    runtime: dict[str, dict] = {}
    for rec in ran:
        for stage, seconds in rec["timings"].items():
            runtime.setdefault(stage, {"wall": 0.0})["wall"] += seconds
    for stage, seconds in stages.items():
        runtime[stage] = {"wall": seconds}
    if ran:
        runtime["total"] = {"wall": sum(r["wall"] for r in ran),
                            "cpu": sum(r["cpu"] for r in ran),
                            "peak_rss": max(r["peak_rss_bytes"] for r in ran)}
    return runtime


def run_metrics(out: Path, records: list[dict], totals: AssociationTotals,
                runtime: dict[str, dict], tags: dict[str, str], seed: int
                ) -> list[Measurement]:
    """Every metric of the finished units (fakes, false DIASources, quality, counts, runtime)."""
    ok = [r for r in records if r["status"] in OK]
    matched = pd.concat([pd.read_parquet(unit_dir(out, r["visit"], r["detector"])
                                         / "matched.parquet") for r in ok], ignore_index=True)
    dia = pd.concat([pd.read_parquet(unit_dir(out, r["visit"], r["detector"])
                                     / "diaSources.parquet") for r in ok], ignore_index=True)
    real = np.array(sorted({i for r in ok for i in r["real_ids"]}), np.int64)
    return compute_metrics(
        matched=matched, dia_sources=dia, real_ids=real,
        area_deg2=sum(r["area_deg2"] for r in ok), n_exposures=len(ok),
        diffim=[{"visit": r["visit"], "detector": r["detector"], **r["diffim"]} for r in ok],
        calibration=[{"visit": r["visit"], "detector": r["detector"], **r["calibration"]}
                     for r in ok],
        counts={"per_visit": totals.per_visit, "dia_objects": totals.dia_objects,
                "alerts": {"count": totals.n_alerts, "total_bytes": totals.alert_bytes}},
        runtime=runtime or None, tags=tags, seed=seed)


def timed(stages: dict[str, float], name: str, start: float) -> None:
    """Record the wall time of a driver stage that started at ``start``."""
    stages[name] = time.perf_counter() - start
