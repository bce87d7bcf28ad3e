"""Alert packets: lsst-alert-packet's own reader, cutouts, Avro files and a Kafka round trip."""

from __future__ import annotations

import dataclasses
import io
import struct

import fastavro
import numpy as np
import pandas as pd
import pytest
from astropy.nddata import CCDData
from astropy.wcs import WCS, Sip
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from lsst.alert.packet import Schema

from apqa.datamodel import Exposure, MoffatPsf, PhotoCalib, VisitInfo
from apqa.datamodel.apdb_schema import conform, empty_table, load_apdb_schema
from apqa.errors import StageError
from apqa.pipeline.alert_avro import RecordEncoder, record_fields
from apqa.pipeline.alert_publish import AlertWriter, write_avro
from apqa.pipeline.alerts import AlertConfig, build_alerts
from apqa.pipeline.apdb import Apdb
from apqa.pipeline.associate import associate
from apqa.pipeline.forced import forced_photometry

SHAPE = (200, 300)
MJD = 60100.0


def _wcs(shift=(0.0, 0.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [150.5 + shift[0], 100.5 + shift[1]]
    w.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], b[0, 2] = 2e-5, -1e-5
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def _exposure(seed: int, zero_point: float, shift=(0.0, 0.0)) -> Exposure:
    rng = np.random.default_rng(seed)
    exp = Exposure(rng.normal(0, 5, SHAPE), rng.uniform(20, 30, SHAPE),
                   psf=MoffatPsf(SHAPE[1], SHAPE[0], [3.5]), wcs=_wcs(shift),
                   photo_calib=PhotoCalib.from_zero_point(zero_point),
                   visit_info=VisitInfo(9, 2, "i", "i", MJD, 30.0))
    exp.mask.set("SAT", rng.random(SHAPE) < 0.01)
    return exp


@pytest.fixture(scope="module")
def scene():
    """Exposures, 40 associated DiaSources (one unassociated), objects and their history."""
    rng = np.random.default_rng(5)
    difference, science = _exposure(1, 28.0), _exposure(2, 28.0)
    template = _exposure(3, 29.0, shift=(3.0, -2.0))  # on its own grid
    n = 40
    src = empty_table("DiaSource", n)
    src["diaSourceId"] = 9 * 10**8 + 2 * 10**5 + np.arange(n)
    src["visit"], src["detector"], src["band"] = 9, 2, "i"
    src["midpointMjdTai"], src["timeProcessedMjdTai"] = MJD, MJD + 0.01
    src["x"] = rng.uniform(-5, SHAPE[1] + 5, n)  # some cutouts run off the image
    src["y"] = rng.uniform(0, SHAPE[0] - 1, n)
    src["ra"], src["dec"] = difference.pixel_to_sky(src["x"], src["y"])
    src["psfFlux"] = rng.normal(0, 3000, n)
    src["psfFluxErr"] = 150.0
    src["isNegative"] = src["psfFlux"] < 0
    src["pixelFlags_bad"] = pd.array(rng.choice([True, False, None], n), "boolean")
    src["bboxSize"] = rng.integers(5, 140, n)
    src["reliability"], src["reliabilityVersion"] = rng.random(n), "rb-ü1"
    src["diaObjectId"] = pd.array(5000 + np.arange(n), "Int64")
    src.loc[7, "diaObjectId"] = pd.NA
    obj = empty_table("DiaObject", n)
    obj["diaObjectId"] = 5000 + np.arange(n)
    obj["ra"], obj["dec"] = src["ra"], src["dec"]
    obj["nDiaSources"] = 4
    obj["validityStartMjdTai"] = MJD
    obj["i_psfFluxMean"] = rng.normal(0, 1000, n)
    obj = obj.drop(index=7).reset_index(drop=True)
    # History: three earlier epochs per object, one of them beyond the 365-day window.
    hist = pd.concat([src.assign(diaSourceId=src["diaSourceId"] + k * 10**9,
                                 midpointMjdTai=MJD - days, visit=9 - k)
                      for k, days in ((1, 400.0), (2, 30.0), (3, 2.0))], ignore_index=True)
    hist = hist[hist["diaObjectId"].notna()]
    forced = empty_table("DiaForcedSource", 2 * len(obj))
    forced["diaForcedSourceId"] = np.arange(2 * len(obj))
    forced["diaObjectId"] = np.tile(obj["diaObjectId"].to_numpy(), 2)
    forced["ra"], forced["dec"] = np.tile(obj["ra"], 2), np.tile(obj["dec"], 2)
    forced["visit"], forced["detector"], forced["band"] = 8, 2, "i"
    forced["midpointMjdTai"] = np.repeat([MJD - 10.0, MJD - 1.0], len(obj))
    forced["timeProcessedMjdTai"] = MJD
    forced["psfFlux"] = rng.normal(0, 100, len(forced))
    batch = build_alerts(conform(src, "DiaSource"), obj, difference, science, template,
                         history=conform(hist, "DiaSource"), forced_history=forced)
    return dict(batch=batch, src=conform(src, "DiaSource"), obj=obj, hist=hist, forced=forced,
                exposures=(difference, science, template))


def _expected(value):
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _assert_record(record: dict, row: pd.Series) -> None:
    for key, value in record.items():
        want = _expected(row[key]) if key in row.index else None
        if isinstance(want, float) and value is not None:
            assert value == pytest.approx(want, rel=1e-6), key
        else:
            assert value == want, key


def test_packets_read_back_with_lsst_alert_packet(scene):
    batch, src, obj, hist = scene["batch"], scene["src"], scene["obj"], scene["hist"]
    schema = Schema.from_uri()
    assert schema.get_schema_id() == 1101
    assert len(batch) == len(src) and batch.dia_source_ids == src["diaSourceId"].tolist()
    for body, (_, row) in zip(batch.bodies, src.iterrows(), strict=True):
        packet = schema.deserialize(body)
        assert schema.validate(packet)
        # Byte for byte what lsst-alert-packet's own serializer makes of the same packet.
        assert schema.serialize(packet) == body
        assert packet["diaSourceId"] == row["diaSourceId"]
        _assert_record(packet["diaSource"], row)
        assert "ssObjectReassocTimeMjdTai" not in packet["diaSource"]
        if pd.isna(row["diaObjectId"]):
            assert packet["diaObject"] is None and packet["prvDiaSources"] is None
            continue
        oid = int(row["diaObjectId"])
        _assert_record(packet["diaObject"], obj.set_index("diaObjectId", drop=False).loc[oid])
        earlier = hist[(hist["diaObjectId"] == oid) & (hist["midpointMjdTai"] > MJD - 365)]
        assert [p["diaSourceId"] for p in packet["prvDiaSources"]] == earlier.sort_values(
            "midpointMjdTai")["diaSourceId"].tolist()
        assert [p["midpointMjdTai"] for p in packet["prvDiaForcedSources"]] == [MJD - 10, MJD - 1]
        assert packet["ssSource"] is None and packet["observation_reason"] is None


def test_cutouts_carry_pixels_and_wcs(scene):
    batch, src = scene["batch"], scene["src"]
    packets = batch.packets()
    for packet, (_, row) in zip(packets, src.iterrows(), strict=True):
        size = int(np.clip(row["bboxSize"], 30, 102))
        for key, exp in zip(("cutoutDifference", "cutoutScience", "cutoutTemplate"),
                            scene["exposures"], strict=True):
            cut = CCDData.read(io.BytesIO(packet[key]))
            assert cut.shape == (size, size) and cut.unit == "nJy"
            x, y = exp.sky_to_pixel(row["ra"], row["dec"])
            x0, y0 = int(np.floor(x + 0.5)) - size // 2, int(np.floor(y + 0.5)) - size // 2
            # The cutout's WCS is the exposure's, shifted (SIP included).
            sky = cut.wcs.all_pix2world([[3.0, 5.0]], 0)
            np.testing.assert_allclose(sky, exp.wcs.all_pix2world([[3.0 + x0, 5.0 + y0]], 0),
                                       rtol=0, atol=1e-10)
            scale = exp.photo_calib.calibration_mean
            ys, xs = slice(max(y0, 0), y0 + size), slice(max(x0, 0), x0 + size)
            inside = cut.data[max(-y0, 0):, max(-x0, 0):][:exp.shape[0] - max(y0, 0),
                                                          :exp.shape[1] - max(x0, 0)]
            np.testing.assert_allclose(inside, exp.image[ys, xs] * np.float32(scale),
                                       rtol=1e-6)
            assert np.isnan(cut.data).sum() == size * size - inside.size
            assert cut.mask.sum() >= size * size - inside.size  # off-image pixels are NO_DATA


def test_avro_file_reads_with_lsst_alert_packet(scene, tmp_path):
    batch = scene["batch"]
    path = write_avro(tmp_path / "alerts_9_2.avro", batch.bodies, block_size=7)
    with open(path, "rb") as fh:
        _, records = Schema.from_uri().retrieve_alerts(fh)
        ids = [r["diaSourceId"] for r in records]
    assert ids == batch.dia_source_ids
    with open(path, "rb") as fh:
        assert len(list(fastavro.reader(fh))) == len(batch)
    assert not list(tmp_path.glob("*.partial"))
    # Same bodies, same file: the sync marker comes from the name.
    again = write_avro(tmp_path / "copy" / "alerts_9_2.avro", batch.bodies, block_size=7)
    assert again.read_bytes() == path.read_bytes()


def test_kafka_round_trip_on_mock_cluster(scene, tmp_path):
    batch = scene["batch"]
    cluster = Producer({"test.mock.num.brokers": 1})  # real brokers while this client lives
    brokers = ",".join(f"{b.host}:{b.port}" for b in cluster.list_topics(timeout=10)
                       .brokers.values())
    writer = AlertWriter(tmp_path, kafka_bootstrap=brokers, topic="apqa-test-alerts")
    stats = writer.write(9, 2, batch)
    assert stats.delivered == len(batch) and stats.failed == 0
    assert stats.total_bytes == sum(len(b) for b in batch.bodies)
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "apqa-test",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics("apqa-test-alerts", timeout=10).topics[
        "apqa-test-alerts"].partitions
    consumer.assign([TopicPartition("apqa-test-alerts", p, OFFSET_BEGINNING)
                     for p in partitions])
    schema = Schema.from_uri()
    received = {}
    while len(received) < len(batch):
        message = consumer.poll(10)
        assert message is not None, f"only {len(received)} of {len(batch)} alerts arrived"
        assert message.error() is None
        magic, schema_id = struct.unpack(">bi", message.value()[:5])
        assert (magic, schema_id) == (0, 1101)
        packet = schema.deserialize(message.value()[5:])
        assert message.key() == str(packet["diaSourceId"]).encode()
        received[packet["diaSourceId"]] = packet
    consumer.close()
    assert sorted(received) == sorted(batch.dia_source_ids)
    del cluster


def test_unreachable_broker_keeps_alerts_in_the_file(scene, tmp_path):
    batch = scene["batch"]
    writer = AlertWriter(tmp_path, kafka_bootstrap="127.0.0.1:1", timeout_s=1.0)
    stats = writer.write(9, 2, batch)
    assert stats.delivered == 0 and stats.failed == len(batch)
    assert sum(stats.errors.values()) == len(batch)
    with open(stats.path, "rb") as fh:
        _, records = Schema.from_uri().retrieve_alerts(fh)
        assert [r["diaSourceId"] for r in records] == batch.dia_source_ids


def test_invalid_values_stop_packaging(scene):
    src = scene["src"].copy()
    difference, science, template = scene["exposures"]
    src.loc[3, "x"] = np.nan
    with pytest.raises(StageError, match=r"diaSource\.x is required but 1 rows have no value"):
        build_alerts(src, scene["obj"], difference, science, template)
    encoder = RecordEncoder(record_fields("diaObject"), "diaObject")
    wide = empty_table("DiaObject", 1)
    wide["nDiaSources"] = np.array([2**31], np.int64)
    with pytest.raises(StageError, match=r"diaObject\.nDiaSources holds values beyond the 32-bit"):
        encoder.encode(wide)
    with pytest.raises(StageError, match=r"diaObject\.u_psfFluxNdata is required but the "
                                         r"table has no such column"):
        encoder.encode(wide.drop(columns="u_psfFluxNdata"))


def test_record_encoding_matches_fastavro_on_random_tables():
    rng = np.random.default_rng(9)
    n = 50
    table = empty_table("DiaSource", n)
    for col in load_apdb_schema()["DiaSource"].columns:
        name, kind = col.name, str(table[col.name].dtype)
        if kind.startswith("float"):
            values = rng.normal(0, 1e4, n)
            if col.nullable:
                values[rng.random(n) < 0.3] = np.nan
            values[0] = np.inf
            table[name] = values
        elif kind in ("boolean", "bool"):
            table[name] = pd.array(rng.choice([True, False, None], n), kind) if (
                kind == "boolean") else rng.random(n) < 0.5
        elif kind != "object":
            table[name] = pd.array(rng.integers(-30000, 30000, n), kind)
    table["diaSourceId"] = rng.integers(-2**62, 2**62, n)
    table["band"] = rng.choice(["g", "ñ", None], n)
    fields = record_fields("diaSource")
    rows = RecordEncoder(fields, "diaSource").encode(table)
    schema = fastavro.parse_schema({"type": "record", "name": "t", "fields": fields})
    for i, row in enumerate(rows):
        record = {f["name"]: _expected(table[f["name"]].iloc[i]) if f["name"] in table
                  else None for f in fields}
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        assert out.getvalue() == row, i


def test_history_window_is_configurable(scene):
    difference, science, template = scene["exposures"]
    batch = build_alerts(scene["src"], scene["obj"], difference, science, template,
                         history=conform(scene["hist"], "DiaSource"),
                         config=AlertConfig(history_days=5.0, cutout_min=16, cutout_max=20))
    packet = batch.packets()[0]
    assert len(packet["prvDiaSources"]) == 1 and packet["prvDiaForcedSources"] == []
    assert CCDData.read(io.BytesIO(packet["cutoutScience"])).shape[0] in range(16, 21)


def test_two_visits_through_associate_forced_apdb_and_alerts(scene, tmp_path):
    """The runner's sequence: region read, association, forced photometry, store, alerts."""
    rng = np.random.default_rng(11)
    x, y = rng.uniform(40, SHAPE[1] - 40, 25), rng.uniform(40, SHAPE[0] - 40, 25)
    ra, dec = scene["exposures"][0].pixel_to_sky(x, y)
    cone = (*scene["exposures"][0].pixel_to_sky(SHAPE[1] / 2, SHAPE[0] / 2), 0.02)
    apdb = Apdb.create(tmp_path / "apdb.sqlite3")
    batches = []
    for visit, mjd in ((8, MJD - 1.0), (9, MJD)):
        difference, science, template = (
            dataclasses.replace(exp, visit_info=VisitInfo(visit, 2, "i", "i", mjd, 30.0))
            for exp in scene["exposures"])
        src = empty_table("DiaSource", len(x))
        src["diaSourceId"] = visit * 10**8 + 2 * 10**5 + np.arange(len(x))
        src["visit"], src["detector"], src["band"] = visit, 2, "i"
        src["midpointMjdTai"], src["timeProcessedMjdTai"] = mjd, mjd + 0.01
        src["x"], src["y"], src["ra"], src["dec"] = x, y, ra, dec
        src["raErr"] = src["decErr"] = 0.05 / 3600
        src["psfFlux"], src["psfFluxErr"], src["bboxSize"] = 500.0 * visit, 50.0, 20
        objects, history = apdb.read_region(cone, before_mjd=mjd)
        result = associate(src, objects, history=history)
        forced = forced_photometry(result.footprint_objects, difference, science)
        apdb.store_visit(visit, 2, result.dia_sources, result.dia_objects, forced)
        earlier_forced = apdb.read_forced_sources(result.dia_objects["diaObjectId"],
                                                  before_mjd=mjd)
        batches.append(build_alerts(result.dia_sources, result.dia_objects, difference,
                                    science, template, history=history,
                                    forced_history=earlier_forced))
    counts = apdb.counts()
    apdb.close()
    assert counts["DiaSource"] == 50 and counts["DiaObject (current)"] == 25
    assert counts["DiaForcedSource"] == 25  # only visit 9: objects need two DiaSources
    first, second = batches[0].packets(), batches[1].packets()
    assert all(p["prvDiaSources"] == [] and p["diaObject"]["nDiaSources"] == 1 for p in first)
    for packet in second:
        assert packet["diaObject"]["nDiaSources"] == 2
        assert packet["diaObject"]["i_psfFluxMean"] == pytest.approx(0.5 * (4000 + 4500))
        assert [p["visit"] for p in packet["prvDiaSources"]] == [8]
        assert packet["prvDiaForcedSources"] == []  # visit 9's forced rows are not "earlier"
        assert packet["diaSource"]["diaObjectId"] == packet["prvDiaSources"][0]["diaObjectId"]
