"""The end of alert production for one visit-detector: read the APDB for the detector's
footprint, associate the DIASources, force-photometer known objects, store everything in one
transaction and write (and optionally publish) the alert packets.

This is the runner's glue between the DIASource table and the products of issue 7; each step
is its own module (``apdb``, ``associate``, ``forced``, ``alerts``, ``alert_publish``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.pipeline.alert_publish import AlertStats, AlertWriter
from apqa.pipeline.alerts import AlertConfig, build_alerts
from apqa.pipeline.associate import AssociationConfig, associate
from apqa.pipeline.forced import forced_photometry
from apqa.pipeline.sky_geometry import footprint_cone

if TYPE_CHECKING:  # a type only: units on Dask workers need no SQLAlchemy
    from apqa.pipeline.apdb import Apdb


class AlertProductionConfig(ConfigModel):
    """Association, forced photometry and alert settings."""

    association: AssociationConfig = Field(default_factory=AssociationConfig)
    alerts: AlertConfig = Field(default_factory=AlertConfig)
    footprint_margin_arcsec: float = Field(
        5.0, ge=0, description="objects this far outside the detector are read too (moving "
                               "and badly centred sources)")


@dataclass
class AlertProductionResult:
    """Counts and timings of one visit-detector's association and alerts."""

    dia_sources: pd.DataFrame
    counts: dict[str, float] = field(default_factory=dict)
    n_forced: int = 0
    alerts: AlertStats | None = None
    timings: dict[str, float] = field(default_factory=dict)


def produce_alerts(apdb: Apdb, dia_sources: pd.DataFrame, difference: Exposure,
                   science: Exposure, template: Exposure, alert_dir: str | Path,
                   config: AlertProductionConfig | None = None,
                   kafka_bootstrap: str | None = None, topic: str = "apqa-alerts"
                   ) -> AlertProductionResult:
    """Associate, force-photometer, store and alert one visit-detector.

    Parameters
    ----------
    apdb
        An open :class:`Apdb`.
    dia_sources
        The visit-detector's DiaSource table (``apqa.pipeline.measure``).
    difference, science, template
        The difference, the science exposure and the template on the science grid.
    alert_dir
        Where ``alerts_{visit}_{detector}.avro`` goes.
    kafka_bootstrap, topic
        Publish to this broker too (None: files only).
    """
    config = config or AlertProductionConfig()
    info = difference.visit_info
    visit, detector, mjd = info.visit, info.detector, info.mjd
    timings: dict[str, float] = {}
    start = time.perf_counter()
    objects = apdb.read_objects(
        footprint_cone(difference, config.footprint_margin_arcsec), before_mjd=mjd)
    timings["apdb_read"] = time.perf_counter() - start

    start = time.perf_counter()
    # Earlier sources only of the objects this visit updates (summaries and alerts need no
    # others); their read counts as association time.
    result = associate(dia_sources, objects, config.association,
                       history=lambda ids: apdb.read_sources(ids, before_mjd=mjd))
    timings["associate"] = time.perf_counter() - start

    start = time.perf_counter()
    forced = forced_photometry(result.footprint_objects, difference, science, visit, detector)
    timings["forced"] = time.perf_counter() - start

    start = time.perf_counter()
    apdb.store_visit(visit, detector, result.dia_sources, result.dia_objects, forced)
    timings["apdb_write"] = time.perf_counter() - start

    start = time.perf_counter()
    ids = result.dia_objects["diaObjectId"].to_numpy()
    forced_history = apdb.read_forced_sources(ids, before_mjd=mjd) if len(ids) else None
    batch = build_alerts(result.dia_sources, result.dia_objects, difference, science, template,
                         history=result.history, forced_history=forced_history,
                         config=config.alerts)
    stats = AlertWriter(alert_dir, kafka_bootstrap, topic).write(visit, detector, batch)
    timings["alerts"] = time.perf_counter() - start
    return AlertProductionResult(result.dia_sources, dict(result.counts), len(forced), stats,
                                 timings)
