"""Alert packets in the latest lsst-alert-packet schema: one per DiaSource.

Each packet holds the ``diaSource``, its object's earlier DiaSources (``prvDiaSources``) and
DiaForcedSources (``prvDiaForcedSources``) within ``history_days`` (Rubin: 12 months), the
``diaObject`` and three FITS cutouts (difference, science, template) sized to the source
(``bboxSize`` clipped to 30-102 pixels; see :mod:`apqa.pipeline.alert_cutouts`).

APDB rows map to the schema's records by column name. Alert schema 11.1 and apdb.yaml 10.0.0
differ only in two APDB columns the alert records do not carry (DiaSource
``ssObjectReassocTimeMjdTai``, DiaObject ``validityEndMjdTai``); alert fields with no APDB column
(``observation_reason``, ``target_name``, ``ssSource``, ``mpc_orbits``) are null.

Packets are produced directly as Avro bodies (:mod:`apqa.pipeline.alert_avro`): every value is
checked against its schema field while encoding, and every finished body is then read back with
fastavro against the schema (it must parse completely and carry its diaSourceId) before
:func:`build_alerts` returns it.

Examples
--------
>>> batch = build_alerts(result.dia_sources, result.dia_objects, difference, science,
...                      template, history=earlier_sources)          # doctest: +SKIP
>>> len(batch), batch.packets()[0]["diaSource"]["psfFlux"]          # doctest: +SKIP
(812, 1843.2)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import fastavro
import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.errors import StageError
from apqa.pipeline.alert_avro import RecordEncoder, alert_schema, record_fields, varint
from apqa.pipeline.alert_cutouts import CutoutMaker

__all__ = ["AlertBatch", "AlertConfig", "alert_schema", "build_alerts", "parsed_schema"]

_NULL = b"\x00"
_SOME = b"\x02"  # union branch 1


class AlertConfig(ConfigModel):
    """Alert packaging settings."""

    history_days: float = Field(365.0, gt=0, description="Days of prvDiaSources and "
                                "prvDiaForcedSources a packet carries (Rubin: 12 months).")
    cutout_min: int = Field(30, ge=8, description="Smallest cutout side (pixels).")
    cutout_max: int = Field(102, ge=8, description="Largest cutout side (pixels).")


@cache
def parsed_schema() -> dict:
    """The alert schema parsed by fastavro (parsed once; parsing costs milliseconds)."""
    return fastavro.parse_schema(alert_schema().definition)


@dataclass
class AlertBatch:
    """One visit-detector's alert packets as validated Avro bodies (schemaless, no header)."""

    dia_source_ids: list[int]
    bodies: list[bytes]

    def __len__(self) -> int:
        return len(self.bodies)

    def packets(self) -> list[dict]:
        """The packets as dicts, read back with fastavro (what a consumer sees)."""
        schema = parsed_schema()
        return [fastavro.schemaless_reader(io.BytesIO(b), schema) for b in self.bodies]


def _array(rows: list[bytes]) -> bytes:
    """An Avro array in the union's second branch: block count, items, end marker."""
    if not rows:
        return _SOME + _NULL
    return b"".join([_SOME, varint(len(rows)), *rows, _NULL])


def _cutout(data: bytes) -> bytes:
    return b"".join([_SOME, varint(len(data)), data])


def _history_index(table: pd.DataFrame | None) -> tuple[dict, np.ndarray]:
    """Row positions per diaObjectId (sorted by time) and the rows' times."""
    if table is None or len(table) == 0:
        return {}, np.zeros(0)
    ids = table["diaObjectId"].to_numpy(np.int64, na_value=-1)
    times = table["midpointMjdTai"].to_numpy(np.float64)
    order = np.lexsort((times, ids))
    groups = {}
    if order.size:
        sorted_ids = ids[order]
        cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
        for chunk in np.split(order, cuts):
            groups[int(ids[chunk[0]])] = chunk
    return groups, times


def _encode(table: pd.DataFrame | None, record: str) -> list[bytes]:
    if table is None or len(table) == 0:
        return []
    return RecordEncoder(record_fields(record), record).encode(table)


def _cutout_makers(difference: Exposure, science: Exposure, template: Exposure,
                   sources: pd.DataFrame) -> list[tuple[CutoutMaker, np.ndarray, np.ndarray]]:
    """A cutout maker per exposure with the sources' pixel positions on it: the difference's
    pixels (and WCS header) wherever an exposure shares its grid."""
    x = sources["x"].to_numpy(np.float64)
    y = sources["y"].to_numpy(np.float64)
    header = difference.wcs.to_header(relax=True) if difference.wcs is not None else None
    makers = []
    for exposure in (difference, science, template):
        if exposure is difference or exposure.same_grid(difference):
            makers.append((CutoutMaker(exposure, header), x, y))
        else:
            px, py = exposure.sky_to_pixel(sources["ra"].to_numpy(np.float64),
                                           sources["dec"].to_numpy(np.float64))
            makers.append((CutoutMaker(exposure), px, py))
    return makers


@cache
def _id_reader() -> dict:
    """A reader schema with only ``diaSourceId``: fastavro then walks every field of the packet
    (union branches, lengths, nested records) without building dicts, twice as fast."""
    return fastavro.parse_schema({"type": "record", "name": alert_schema().definition["name"],
                                  "fields": [{"name": "diaSourceId", "type": "long"}]})


def _check(bodies: list[bytes], ids: list[int]) -> None:
    """Read every body back against the schema: it must parse fully and carry its id."""
    schema, reader = parsed_schema(), _id_reader()
    for body, expected in zip(bodies, ids, strict=True):
        stream = io.BytesIO(body)
        try:
            packet = fastavro.schemaless_reader(stream, schema, reader)
        except Exception as exc:  # fastavro raises assorted types on malformed data
            raise StageError(f"alert for diaSourceId {expected} does not read back with the "
                             f"alert schema: {exc}") from None
        if stream.tell() != len(body) or packet["diaSourceId"] != expected:
            raise StageError(f"alert for diaSourceId {expected} does not read back with the "
                             "alert schema (trailing bytes or wrong id)")


def build_alerts(dia_sources: pd.DataFrame, dia_objects: pd.DataFrame, difference: Exposure,
                 science: Exposure, template: Exposure, *, history: pd.DataFrame | None = None,
                 forced_history: pd.DataFrame | None = None,
                 config: AlertConfig | None = None) -> AlertBatch:
    """One validated alert packet per DiaSource of one visit-detector.

    Parameters
    ----------
    dia_sources
        The visit-detector's associated DiaSources (``AssociationResult.dia_sources``).
    dia_objects
        Their DiaObjects after this visit (``AssociationResult.dia_objects``).
    difference, science, template
        The exposures the cutouts come from (the template usually warped to the science grid).
    history, forced_history
        Earlier DiaSources and DiaForcedSources of the objects (``Apdb.read_region`` and
        ``Apdb.read_forced_sources`` with ``before_mjd`` = the visit midpoint).
    config
        :class:`AlertConfig`.

    Returns
    -------
    AlertBatch
    """
    config = config or AlertConfig()
    top = [f["name"] for f in alert_schema().definition["fields"]]
    if top[:3] != ["diaSourceId", "observation_reason", "target_name"] or top[3:] != [
            "diaSource", "prvDiaSources", "prvDiaForcedSources", "diaObject", "ssSource",
            "mpc_orbits", "cutoutDifference", "cutoutScience", "cutoutTemplate"]:
        raise StageError(f"alert schema {alert_schema().get_schema_id()}: unexpected "
                         f"top-level fields {top}")
    object_ids = dia_sources["diaObjectId"].to_numpy(np.int64, na_value=-1)
    # Only the linked objects' history goes into packets: encode nothing else (a footprint's
    # history holds every object there, mostly not seen in this visit).
    history, forced_history = (
        None if table is None else table[table["diaObjectId"].isin(object_ids)]
        for table in (history, forced_history))
    sources = _encode(dia_sources, "diaSource")
    objects = _encode(dia_objects, "diaObject")
    object_at = dict(zip(dia_objects["diaObjectId"].to_numpy(np.int64).tolist(), objects,
                         strict=True))
    prv_rows, forced_rows = _encode(history, "diaSource"), _encode(forced_history,
                                                                   "prvDiaForcedSources")
    prv_index, forced_index = _history_index(history), _history_index(forced_history)
    makers = _cutout_makers(difference, science, template, dia_sources)
    sizes = np.clip(dia_sources["bboxSize"].to_numpy(np.int64), config.cutout_min,
                    config.cutout_max).tolist()
    ids = dia_sources["diaSourceId"].to_numpy(np.int64).tolist()
    object_ids = object_ids.tolist()
    mjd = dia_sources["midpointMjdTai"].to_numpy(np.float64).tolist()

    def earlier(index: tuple[dict, np.ndarray], rows: list[bytes], oid: int, t: float
                ) -> bytes:
        positions = index[0].get(oid)
        if positions is None:
            return _array([])
        times = index[1][positions]
        chosen = positions[(times >= t - config.history_days) & (times < t)]
        return _array([rows[i] for i in chosen.tolist()])

    bodies = []
    for i, record in enumerate(sources):
        oid = object_ids[i]
        linked = oid >= 0
        parts = [varint(ids[i]), _NULL, _NULL, record,
                 earlier(prv_index, prv_rows, oid, mjd[i]) if linked else _NULL,
                 earlier(forced_index, forced_rows, oid, mjd[i]) if linked else _NULL,
                 _SOME + object_at[oid] if oid in object_at else _NULL,
                 _NULL, _NULL]
        parts.extend(_cutout(maker.cutout(px[i], py[i], sizes[i])) for maker, px, py in makers)
        bodies.append(b"".join(parts))
    _check(bodies, ids)
    return AlertBatch(ids, bodies)
