"""Export a run to lsst.verify Job JSON documents (what ap_verify writes as ``*.verify.json``).

A Job holds at most one measurement per metric, so a run becomes one Job per distinct tag set
(as ap_verify writes one per data ID), with the tags and the run's provenance in ``meta``.
lsst.verify names are ``package.metric``: ``apqa.completeness.snr50`` becomes
``apqa_completeness.snr50`` (and back, since families contain no underscore). A measurement's
uncertainty goes into its extras blob as the datum ``uncertainty``. Identifiers are UUID5s of
the run, metric and tags, so the same run always gives the same documents.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

from apqa.metrics.registry import Measurement, get_metric
from apqa.store.store import RunInfo

_NAMESPACE = uuid.UUID("6a0f5f3e-6f43-4d0b-9a55-6b1d7f2b2c11")


def verify_name(metric: str) -> str:
    """lsst.verify's ``package.metric`` name of an apqa metric."""
    _, family, name = metric.split(".")
    return f"apqa_{family}.{name}"


def apqa_name(verify_metric: str) -> str:
    """The apqa metric of an lsst.verify name made by :func:`verify_name`."""
    package, name = verify_metric.split(".")
    return f"{package.replace('_', '.', 1)}.{name}"


def _metric_json(metric: str) -> dict:
    definition = get_metric(metric)
    return {"name": verify_name(metric), "description": definition.description,
            "unit": definition.unit_str, "tags": sorted({definition.stage, "apqa"}),
            "reference": {"doc": None, "page": None, "url": None}}


def _job(run: RunInfo, tags: dict, measurements: list[Measurement]) -> dict:
    job = {"measurements": [], "blobs": [], "metrics": [], "specs": [],
           "meta": {"apqa_run_id": run.id, "dataset": run.dataset, "git_sha": run.git_sha,
                    "git_branch": run.git_branch, "config_hash": run.config_hash,
                    "started_at": run.started_at.isoformat(), **tags}}
    for m in measurements:
        value, unc = m.in_metric_unit()
        unit = get_metric(m.metric).unit_str
        key = f"{run.id}/{m.metric}/{json.dumps(tags, sort_keys=True)}"
        blob_refs = []
        if unc is not None:
            blob_id = uuid.uuid5(_NAMESPACE, key + "/extras").hex
            job["blobs"].append({"identifier": blob_id, "name": verify_name(m.metric), "data": {
                "uncertainty": {"value": unc, "unit": unit, "label": "uncertainty",
                                "description": "one-sigma uncertainty"}}})
            blob_refs.append(blob_id)
        finite = math.isfinite(value)
        job["measurements"].append({
            "metric": verify_name(m.metric), "identifier": uuid.uuid5(_NAMESPACE, key).hex,
            "value": value if finite else None, "unit": unit if finite else None,
            "blob_refs": blob_refs})
        job["metrics"].append(_metric_json(m.metric))
    return job


def verify_jobs(run: RunInfo, measurements: Sequence[Measurement]) -> list[dict]:
    """One lsst.verify Job document per distinct tag set of the run's measurements."""
    groups: dict[str, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(json.dumps(m.tags, sort_keys=True), []).append(m)
    jobs = []
    for key in sorted(groups):
        by_metric: dict[str, Measurement] = {}
        for m in groups[key]:
            by_metric[m.metric] = m  # a Job keys measurements by metric: the last one wins
        jobs.append(_job(run, json.loads(key), list(by_metric.values())))
    return jobs


def write_verify_jobs(run: RunInfo, measurements: Sequence[Measurement], out_dir: str | Path
                      ) -> list[Path]:
    """Write ``run<id>_<n>.verify.json`` files into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, job in enumerate(verify_jobs(run, measurements)):
        path = out / f"run{run.id}_{i:04d}.verify.json"
        path.write_text(json.dumps(job, indent=1, allow_nan=False))
        paths.append(path)
    return paths
