"""Alert delivery: Avro container files per visit-detector and Kafka in Confluent wire format.

Packets arrive as validated Avro bodies (:func:`apqa.pipeline.alerts.build_alerts`); the same
body goes into the visit-detector's Avro container file and, behind the Confluent header (magic
byte 0 and the schema id, 1101 for schema 11.1), to Kafka. The container file is written beside
its final name and renamed, so a crash never leaves half a file.

Examples
--------
>>> writer = AlertWriter("run/alerts", kafka_bootstrap="127.0.0.1:9092")  # doctest: +SKIP
>>> stats = writer.write(410001, 1, batch)                              # doctest: +SKIP
>>> stats.n_alerts, stats.failed                                          # doctest: +SKIP
(812, 0)
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apqa.datamodel.direct_io import StreamWriter
from apqa.errors import InputError
from apqa.log import get_logger
from apqa.pipeline.alert_avro import varint
from apqa.pipeline.alerts import AlertBatch, alert_schema

log = get_logger(__name__)
_FASTAVRO_KEYS = ("__fastavro_parsed", "__named_schemas")


def _plain(definition):
    """The schema definition without fastavro's bookkeeping keys (for file headers)."""
    if isinstance(definition, dict):
        return {k: _plain(v) for k, v in definition.items() if k not in _FASTAVRO_KEYS}
    if isinstance(definition, list):
        return [_plain(v) for v in definition]
    return definition


class AlertFormat:
    """Schema id, Confluent header and file-header JSON of the latest alert schema."""

    def __init__(self) -> None:
        schema = alert_schema()
        self.schema_id = schema.get_schema_id()
        self.header = struct.pack(">bi", 0, self.schema_id)
        self.schema_json = json.dumps(_plain(schema.definition))

    def wire(self, body: bytes) -> bytes:
        """Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body."""
        return self.header + body


def write_avro(path: str | Path, bodies: Sequence[bytes], fmt: AlertFormat | None = None,
               block_size: int = 1000) -> Path:
    """Write pre-serialized alert bodies as an Avro object container file (codec null).

    The file reads with ``fastavro.reader`` or ``lsst.alert.packet``'s ``retrieve_alerts``.
    The sync marker is derived from the file name, so re-runs write identical files.
    """
    fmt = fmt or AlertFormat()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sync = hashlib.md5(path.name.encode()).digest()
    meta = {"avro.schema": fmt.schema_json.encode(), "avro.codec": b"null"}
    header = [b"Obj\x01", varint(len(meta))]
    for key, value in meta.items():
        header += [varint(len(key)), key.encode(), varint(len(value)), value]
    header += [varint(0), sync]
    tmp = path.with_name(path.name + ".partial")
    # Past the page cache where the filesystem allows (see apqa.datamodel.direct_io): a
    # visit's alerts are ~10 MB.
    with StreamWriter(tmp) as out:
        out.write(b"".join(header))
        for start in range(0, len(bodies), block_size):
            block = bodies[start:start + block_size]
            out.write(varint(len(block)) + varint(sum(len(b) for b in block)))
            for body in block:
                out.write(body)
            out.write(sync)
    # The rename makes the file appear whole or not at all if the process dies; no fsync, which
    # would triple the cost of a visit's alerts for protection against an OS crash only.
    tmp.replace(path)
    return path


@dataclass
class DeliveryReport:
    """Outcome of publishing: messages acknowledged by the broker and messages lost."""

    delivered: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class KafkaPublisher:
    """Produces alerts to a Kafka topic with confluent-kafka: batched, with delivery reports.

    Messages are queued with ``produce`` (the client batches them, ``linger.ms``) and delivery
    callbacks are served by ``poll(0)``; :meth:`flush` waits once, at the end, for the rest.
    A broker that cannot be reached makes messages fail after ``timeout_s``; they are counted
    in the report, never raised.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port]``.
    topic
        Topic name (created on first produce when the broker allows it).
    timeout_s
        Per-message delivery timeout (``message.timeout.ms``).
    """

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 30.0,
                 config: dict | None = None) -> None:
        try:
            from confluent_kafka import Producer
        except ImportError:
            raise InputError("--kafka-bootstrap needs confluent-kafka: pip install "
                             "'apqa[kafka]'") from None
        if not topic:
            raise InputError("Kafka topic name is empty")
        self.topic = topic
        self.timeout_s = timeout_s
        self.report = DeliveryReport()
        settings = {"bootstrap.servers": bootstrap, "linger.ms": 50,
                    "message.timeout.ms": int(timeout_s * 1000),
                    "queue.buffering.max.kbytes": 1_048_576, "batch.size": 1_000_000,
                    "message.max.bytes": 10_000_000, **(config or {})}
        self._producer = Producer(settings)

    def _on_delivery(self, err, _msg) -> None:
        if err is None:
            self.report.delivered += 1
        else:
            self.report.failed += 1
            name = err.name()
            self.report.errors[name] = self.report.errors.get(name, 0) + 1

    def publish(self, messages: Iterable[tuple[bytes, bytes]]) -> None:
        """Queue (key, value) messages; serves delivery callbacks as it goes."""
        for key, value in messages:
            while True:
                try:
                    self._producer.produce(self.topic, value=value, key=key,
                                           on_delivery=self._on_delivery)
                    break
                except BufferError:  # local queue full: let the client drain it
                    self._producer.poll(0.1)
            self._producer.poll(0)

    def flush(self) -> DeliveryReport:
        """Wait for outstanding deliveries; anything still queued afterwards counts as failed."""
        left = self._producer.flush(self.timeout_s + 5.0)
        if left:
            self.report.failed += left
            self.report.errors["NOT_DELIVERED_IN_TIME"] = (
                self.report.errors.get("NOT_DELIVERED_IN_TIME", 0) + left)
        return self.report


@dataclass
class AlertStats:
    """What :meth:`AlertWriter.write` did for one visit-detector."""

    path: Path
    n_alerts: int
    total_bytes: int
    delivered: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class AlertWriter:
    """Writes each visit-detector's alerts to ``alerts_{visit}_{detector}.avro`` and, when a
    broker is configured, publishes them to Kafka (key = diaSourceId, value = wire format).

    Parameters
    ----------
    out_dir
        Directory of the Avro files.
    kafka_bootstrap, topic
        Broker and topic; None writes files only.
    timeout_s
        Delivery timeout per message.
    """

    def __init__(self, out_dir: str | Path, kafka_bootstrap: str | None = None,
                 topic: str = "apqa-alerts", timeout_s: float = 30.0) -> None:
        self.out_dir = Path(out_dir)
        self.format = AlertFormat()
        self.publisher = (KafkaPublisher(kafka_bootstrap, topic, timeout_s)
                          if kafka_bootstrap else None)

    def write(self, visit: int, detector: int, batch: AlertBatch) -> AlertStats:
        """Write and (optionally) publish one visit-detector's alerts.

        The file is written before anything is published, so an unreachable broker costs no
        alerts; failed deliveries are reported in the returned stats.
        """
        bodies = batch.bodies
        path = write_avro(self.out_dir / f"alerts_{visit}_{detector}.avro", bodies,
                          self.format)
        stats = AlertStats(path, len(bodies), sum(len(b) for b in bodies))
        if self.publisher is not None:
            self.publisher.report = DeliveryReport()
            self.publisher.publish(
                (str(i).encode(), self.format.wire(b))
                for i, b in zip(batch.dia_source_ids, bodies, strict=True))
            report = self.publisher.flush()
            stats.delivered, stats.failed = report.delivered, report.failed
            stats.errors = dict(report.errors)
            if stats.failed:
                log.warning("visit %s detector %s: %d of %d alerts not delivered to Kafka (%s);"
                            " they are in %s", visit, detector, stats.failed, len(bodies),
                            ", ".join(f"{k}: {v}" for k, v in report.errors.items()), path)
        return stats
