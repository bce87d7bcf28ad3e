"""``apqa inject-and-run`` as a function: dataset -> units (in process or on Dask) ->
association, APDB, alerts -> metrics -> metric store -> gate -> ``run.json``.

Examples
--------
>>> report = inject_and_run(RunOptions(out=Path("run1")))        # doctest: +SKIP
>>> report.n_failed, report.store_run_id                         # doctest: +SKIP
(0, 1)
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from apqa import __version__
from apqa.config import config_hash
from apqa.errors import InputError
from apqa.pipeline.run_data import DatasetSource
from apqa.pipeline.run_exec import Executor, Plan, check_scheduler
from apqa.pipeline.run_layout import write_json
from apqa.pipeline.run_units import InjectRunConfig, unit_seed

if TYPE_CHECKING:
    from apqa.ci import GateReport
    from apqa.metrics.registry import Measurement


@dataclass
class RunOptions:
    """The command's options (see ``apqa inject-and-run --help``)."""

    out: Path
    dataset: str = "hits-sim"
    n_visits: int | None = None
    n_detectors: int | None = None
    seed: int = 0
    config: InjectRunConfig = field(default_factory=InjectRunConfig)
    db: str | None = None
    apdb: str | None = None
    scheduler: str | None = None
    resume: bool = False
    thresholds: Path | None = None


@dataclass
class RunReport:
    """What a run did; ``run_json`` holds the same, with provenance."""

    out: Path
    units: list[dict]
    templates: list[dict]
    measurements: list[Measurement]
    stages: dict[str, float]
    scheduler: str
    apdb: str
    store_url: str | None = None
    store_run_id: int | None = None
    gate: GateReport | None = None
    wall: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.units)

    @property
    def run_json(self) -> Path:
        return self.out / "run.json"


def _default_embedded_visits(opts: RunOptions) -> int:
    return opts.n_visits if opts.n_visits is not None else 2


def inject_and_run(opts: RunOptions, on_start: Callable[[int], None] | None = None,
                   on_unit: Callable[[dict], None] | None = None,
                   on_stage: Callable[[str], None] | None = None) -> RunReport:
    """Run the whole job (see the module notes).

    ``on_start`` gets the number of units, ``on_unit`` each unit record as it finishes and
    ``on_stage`` the name of each driver stage (progress display). Input errors (dataset,
    thresholds, store URL, scheduler) are raised before any work starts.
    """
    start = time.perf_counter()
    stages: dict[str, float] = {}
    notify = on_stage or (lambda _: None)
    scheduler = check_scheduler(opts.scheduler) if opts.scheduler else None
    source = DatasetSource.resolve(opts.dataset, _default_embedded_visits(opts),
                                   opts.n_detectors or 1, opts.seed, opts.config.crop,
                                   opts.config.spec_overrides)
    templates, units = source.plan(opts.n_visits, opts.n_detectors)
    scheduler = scheduler or ("local:2" if len(units) > 1 else "process")
    # A LocalCluster's workers start while the rest of the set-up runs; nothing is written
    # until every input has been checked, and an input error closes the cluster again.
    with Executor(scheduler) as executor:
        # Imported here, not at the top: they import while the workers start.
        from apqa.ci import evaluate_gate, load_thresholds
        from apqa.pipeline.run_driver import (
            RunAssociator,
            run_metrics,
            runtime_records,
            timed,
        )
        from apqa.store import MetricStore

        thresholds = load_thresholds(opts.thresholds) if opts.thresholds else None
        store = MetricStore(opts.db)
        out = opts.out.resolve()
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {opts.out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        default_apdb = out / "apdb.sqlite"
        apdb_url = opts.apdb or str(default_apdb)
        (on_start or (lambda _: None))(len(units))

        notify("units")
        t = time.perf_counter()
        plan = Plan(source, opts.config, opts.seed, str(out), templates, units, opts.resume)
        if opts.apdb is None:  # the run's own APDB is rebuilt in visit order every time
            default_apdb.unlink(missing_ok=True)
        show_unit = on_unit or (lambda _: None)

        def finished(record: dict) -> None:
            show_unit(record)
            associator.offer(record)  # associates it (and any units it unblocked) in order

        with RunAssociator(out, units, apdb_url, opts.config) as associator:
            template_records, records = executor.run(plan, finished)
            timed(stages, "units", t)
        executor.release()  # the workers shut down while the driver measures and stores
        # Association ran while later units were still running: its own time, overlapped.
        stages["associate"] = associator.seconds
        totals = associator.totals

        report = RunReport(out, records, template_records, [], stages, scheduler, apdb_url)
        if any(r["status"] in ("done", "skipped") for r in records):
            notify("metrics")
            t = time.perf_counter()
            tags = {"dataset": source.name, "algorithm": opts.config.run.diff.algorithm}
            report.measurements = run_metrics(out, records, totals,
                                              runtime_records(records, dict(stages)), tags,
                                              opts.seed)
            timed(stages, "metrics", t)
            notify("store")
            t = time.perf_counter()
            with store.recording(source.name, config_hash(opts.config)) as recorder:
                recorder.add(report.measurements)
            report.store_url, report.store_run_id = store.display_url, recorder.run_id
            if thresholds is not None:
                report.gate = evaluate_gate(store, recorder.run_id, thresholds)
            timed(stages, "store", t)
    store.close()
    report.wall = time.perf_counter() - start
    write_json(_provenance(opts, source, report), out / "run.json")
    return report


def _provenance(opts: RunOptions, source: DatasetSource, report: RunReport) -> dict:
    from apqa.store.provenance import git_info, installed_versions

    sha, branch = git_info()
    return {
        "apqa_version": __version__, "python": platform.python_version(),
        "git_sha": sha, "git_branch": branch, "versions": installed_versions(),
        "dataset": source.name, "dataset_source": source.path or "embedded",
        "simulation": source.sim.model_dump(mode="json") if source.sim else None,
        "config": opts.config.model_dump(mode="json"), "config_hash": config_hash(opts.config),
        "seed": opts.seed, "scheduler": report.scheduler, "resume": opts.resume,
        "apdb": report.apdb, "metric_store": report.store_url,
        "metric_run_id": report.store_run_id,
        "gate": None if report.gate is None else {
            "passed": report.gate.passed,
            "failures": [f"{c.name}: {c.value} {c.unit}".strip()
                         for c in report.gate.failures]},
        "wall": report.wall, "stages": report.stages,
        "templates": report.templates,
        "units": [{k: r.get(k) for k in ("visit", "detector", "status", "error", "wall",
                                         "cpu", "peak_rss_bytes", "timings", "n_fakes",
                                         "n_matched", "n_dia_sources")}
                  | {"seed": unit_seed(opts.seed, r["visit"], r["detector"])}
                  for r in report.units],
        "n_failed": report.n_failed,
    }
