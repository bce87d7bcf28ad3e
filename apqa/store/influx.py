"""Export stored runs to InfluxDB v2 (or any server that accepts its write API).

Each measurement becomes one line-protocol point: measurement name = metric name, tags = the
measurement's tags plus ``run_id``, ``dataset``, ``git_branch`` and ``git_sha``, fields
``value``, ``uncertainty`` (when known) and ``unit`` (a string field), time = the run's start.
Points are written synchronously in batches; failed requests (connection errors, 429 and 5xx)
are retried with exponential back-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import pandas as pd
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from urllib3 import Retry
from urllib3.exceptions import HTTPError

from apqa.errors import StageError
from apqa.store.store import MetricStore, RunInfo

RUN_TAGS = ("run_id", "dataset", "git_branch", "git_sha")


def run_points(run: RunInfo, frame: pd.DataFrame) -> Iterator[Point]:
    """Line-protocol points of one run's measurements (NaN values are left out)."""
    base = {"run_id": str(run.id), "dataset": run.dataset, "git_branch": run.git_branch or "",
            "git_sha": (run.git_sha or "")[:12]}
    for row in frame.itertuples():
        if not math.isfinite(row.value):
            continue
        point = Point(row.metric).time(run.started_at, WritePrecision.S)
        for key, value in {**base, **row.tags}.items():
            if value != "":
                point = point.tag(key, value)
        point = point.field("value", float(row.value)).field("unit", row.unit)
        if math.isfinite(row.uncertainty):
            point = point.field("uncertainty", float(row.uncertainty))
        yield point


def export_influx(store: MetricStore, runs: Sequence[RunInfo], *, url: str, org: str,
                  bucket: str, token: str = "", batch_size: int = 5000, retries: int = 5,
                  backoff: float = 0.5, timeout_s: float = 30.0,
                  on_run: Callable[[RunInfo, int], None] | None = None) -> int:
    """Write the measurements of ``runs`` to an InfluxDB v2 bucket; returns the point count.

    ``on_run(run, points)`` is called after each run is written (for progress bars).

    Examples
    --------
    >>> export_influx(MetricStore(), [store.resolve_run("latest")],  # doctest: +SKIP
    ...               url="http://localhost:8086", org="rubin", bucket="apqa", token="...")
    """
    retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                  backoff_factor=backoff, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, raise_on_status=True)
    written = 0
    with InfluxDBClient(url=url, token=token, org=org, timeout=int(timeout_s * 1000),
                        retries=retry) as client:
        write_api = client.write_api(write_options=SYNCHRONOUS)
        for run in runs:
            points = list(run_points(run, store.measurement_frame([run.id])))
            for start in range(0, len(points), batch_size):
                batch = points[start:start + batch_size]
                try:
                    write_api.write(bucket=bucket, org=org, record=batch,
                                    write_precision=WritePrecision.S)
                except (ApiException, HTTPError) as exc:
                    reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
                    raise StageError(f"InfluxDB write to {url} (bucket {bucket!r}) failed after "
                                     f"{retries} retries: {reason}") from None
                written += len(batch)
            if on_run is not None:
                on_run(run, len(points))
    return written
