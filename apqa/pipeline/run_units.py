"""The two kinds of task of ``apqa inject-and-run``, each run in any process (in process or on a
Dask worker) and each returning a small summary dict, never images.

* :func:`run_template` processes a detector's template visit once (ISR, characterize,
  calibrate) into ``OUT/templates/dNN/calexp.fits``.
* :func:`run_unit` takes one science visit-detector from raw pixels to its matched table:
  load/simulate -> ISR/calibrate -> draw fakes (seeded by seed, visit, detector; negative fakes
  into a copy of the template, the rest into the science image) -> difference -> detect/measure
  -> match, and writes its outputs (see :mod:`apqa.pipeline.run_layout`).

A unit that raises is recorded as ``failed`` in its ``unit.json`` (with the error and a traceback
in ``error.log``) and returned as such: one bad input never stops the others.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits

from apqa import __version__
from apqa.config import ConfigModel, config_hash, stable_hash
from apqa.datamodel import Exposure
from apqa.errors import ConfigError, StageError
from apqa.injection.catalog import CatalogConfig, generate_catalog
from apqa.injection.draw import inject, known_gain
from apqa.injection.match import MatchConfig, match_fakes, merge_injected
from apqa.log import get_logger
from apqa.pipeline.alerts import AlertConfig
from apqa.pipeline.associate import AssociationConfig
from apqa.pipeline.isr import run_isr
from apqa.pipeline.run_data import REAL_KINDS, DatasetSource
from apqa.pipeline.run_layout import (
    CHECKSUM,
    UNIT_FILE,
    checksum,
    finished,
    template_dir,
    unit_dir,
    write_exposure,
    write_json,
    write_parquet,
)
from apqa.pipeline.runner import RunConfig, peak_rss_bytes, run_pair
from apqa.pipeline.single_visit import (
    SingleVisitConfig,
    SingleVisitResult,
    process_after_isr,
)

log = get_logger(__name__)

#: ``--fake-kinds`` names and the injection fake classes they draw.
FAKE_KINDS = {"point": "isolated", "hosted": "hosted", "variable": "variable",
              "negative": "negative", "trail": "trail"}


#: The default fake count: 200 on a 2048x4096 detector, the same density elsewhere.
DEFAULT_FAKES_SHAPE = (4096, 2048)
FAKES_PER_PIXEL = 200 / (DEFAULT_FAKES_SHAPE[0] * DEFAULT_FAKES_SHAPE[1])


class InjectRunConfig(ConfigModel):
    """Settings of ``apqa inject-and-run`` (the ``--config`` YAML; options override them)."""

    n_fakes: int | None = Field(
        None, ge=0, description="fakes per visit-detector; by default 200 on a 2048x4096 "
        "detector and in proportion to the pixel area on others (a small cut-out gets a few)")
    fake_density: float | None = Field(None, gt=0, description="fakes per deg^2 (overrides "
                                       "n_fakes)")
    fake_kinds: list[str] = Field(default_factory=lambda: ["point", "hosted", "negative"],
                                  description=f"kinds of fakes, from {sorted(FAKE_KINDS)}")
    fake_mag_range: tuple[float, float] = (20.0, 25.0)
    crop: tuple[int, int, int, int] | None = Field(
        None, description="x0, y0, width, height: process only this part of each detector")
    spec_overrides: dict[str, float] = Field(
        default_factory=dict, description="embedded datasets: simulator parameters to change "
        "(SimulationConfig.spec_overrides), e.g. {star_density: 16000}")
    single_visit: SingleVisitConfig = Field(default_factory=SingleVisitConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    match: MatchConfig = Field(default_factory=MatchConfig)
    association: AssociationConfig = Field(default_factory=AssociationConfig)
    alerts: AlertConfig = Field(default_factory=AlertConfig)
    real_radius_arcsec: float = Field(
        1.0, gt=0, description="DiaSources this close to a true transient or asteroid are real")

    def catalog_config(self, shape: tuple[int, int] | None = None) -> CatalogConfig:
        """Injection settings for an exposure of ``shape`` (height, width), which sets the
        default number of fakes (:data:`FAKES_PER_PIXEL`)."""
        unknown = sorted(set(self.fake_kinds) - set(FAKE_KINDS))
        if unknown:
            raise ConfigError(f"fake kinds {unknown}: unknown; expected some of "
                              f"{sorted(FAKE_KINDS)}")
        n = self.n_fakes
        if n is None:
            area = DEFAULT_FAKES_SHAPE[0] * DEFAULT_FAKES_SHAPE[1] if shape is None else (
                shape[0] * shape[1])
            n = max(1, round(FAKES_PER_PIXEL * area))
        return CatalogConfig(n=n, density=self.fake_density,
                             mix={FAKE_KINDS[k]: 1.0 for k in self.fake_kinds},
                             mag_range=self.fake_mag_range)


def unit_seed(seed: int, visit: int, detector: int) -> int:
    """The seed of one visit-detector's fake catalog (independent streams per unit)."""
    return int(np.random.SeedSequence([seed, visit, detector]).generate_state(1)[0])


def _checksums(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: checksum(folder / name) for name in names}


def inputs_key(source: DatasetSource, config: InjectRunConfig, *parts: object) -> str:
    """A hash of what a template's or unit's outputs are made from: the apqa version, the
    dataset, the run configuration and ``parts`` (visit, detector, seed, the template's
    checksum). ``--resume`` reuses outputs only when it is unchanged, so that a run resumed
    with another configuration, seed or apqa release never mixes units made under both."""
    return stable_hash([__version__, repr(source), config_hash(config), *parts])


def run_template(source: DatasetSource, config: InjectRunConfig, visit: int, detector: int,
                 out: str, resume: bool = False) -> dict:
    """Process a detector's template visit into ``OUT/templates/dNN/calexp.fits``.

    Returns its record: ``status`` (done | failed | skipped), ``path``, ``error``.
    """
    folder = template_dir(Path(out), detector)
    path = folder / "calexp.fits"
    key = inputs_key(source, config, "template", visit, detector)
    base = {"visit": visit, "detector": detector, "path": str(path), "error": None,
            "inputs_key": key}
    if resume and (record := finished(folder, key)) is not None:
        return {**record, **base, "status": "skipped"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / UNIT_FILE).unlink(missing_ok=True)
    start, started = time.perf_counter(), time.time()
    try:
        with _one_blas_thread():
            result, _ = _load_and_process(source, config, visit, detector)
        digest = write_exposure(result.calexp, path)
        record = {**base, "status": "done", "timings": result.timings,
                  "quality": result.quality, "checksums": {"calexp.fits": digest},
                  "checksum_algorithm": CHECKSUM}
    except Exception as exc:  # the detector's units report it; other detectors go on
        (folder / "error.log").write_text(traceback.format_exc())
        record = {**base, "status": "failed", "error": _one_line(exc)}
    record.update(wall=time.perf_counter() - start, started=started, finished=time.time())
    write_json(record, folder / UNIT_FILE)
    return record


def _one_blas_thread() -> threadpool_limits:
    """BLAS on one thread while a unit or template runs: a threaded BLAS sums in an order
    that depends on its thread count, and a unit must give the same numbers in this process
    as on a Dask worker (which runs BLAS on one thread) for the same seed."""
    return threadpool_limits(limits=1, user_api="blas")


def _one_line(exc: BaseException) -> str:
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"


def _real_ids(dia: pd.DataFrame, matched: pd.DataFrame, truth: pd.DataFrame | None,
              radius_px: float) -> list[int]:
    """diaSourceIds matched to fakes or lying on a true transient or asteroid."""
    ids = set(matched.loc[matched["matched"], "diaSourceId"].astype("int64").tolist())
    if truth is not None and len(dia) and {"kind", "x", "y"} <= set(truth.columns):
        real = truth[truth["kind"].isin(REAL_KINDS)]
        if len(real):
            tree = cKDTree(real[["x", "y"]].to_numpy(np.float64))
            dist, _ = tree.query(dia[["x", "y"]].to_numpy(np.float64))
            ids |= set(dia.loc[dist <= radius_px, "diaSourceId"].astype("int64").tolist())
    return sorted(ids)


def _load_and_process(source: DatasetSource, config: InjectRunConfig, visit: int,
                      detector: int) -> tuple[SingleVisitResult, pd.DataFrame | None]:
    """Load a visit-detector (simulated, for the embedded datasets) and run single-visit
    processing on it; returns the result (``load`` among its timings) and the truth table.

    The raw pixels and calibration frames go once ISR is done, before characterization: a
    process's peak memory is what limits how many run side by side, and on the project's
    virtual machines every fresh page costs.
    """
    start = time.perf_counter()
    inputs = source.load(visit, detector)
    timings = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    isr = run_isr(inputs.raw, inputs.bias, inputs.flat, inputs.defects,
                  config.single_visit.isr)
    timings["isr"] = time.perf_counter() - start
    truth, psf = inputs.truth, inputs.psf
    del inputs
    result = process_after_isr(isr, source.refcat(), config.single_visit, timings)
    if psf is not None:  # the dataset's own model: fakes are drawn and images matched with it
        result.calexp.psf = psf
    return result, truth


def _process_unit(source: DatasetSource, config: InjectRunConfig, seed: int, visit: int,
                  detector: int, folder: Path, template: dict) -> dict:
    if template["status"] == "failed":
        raise StageError(f"template visit {template['visit']} of detector {detector} failed: "
                         f"{template['error']}")
    start = time.perf_counter()
    template_exp = Exposure.from_fits(template["path"])
    read_template = time.perf_counter() - start
    single, truth = _load_and_process(source, config, visit, detector)
    timings = {**single.timings, "read_template": read_template}
    calexp, sci_sources, q = single.calexp, single.sources, single.quality
    del single

    start = time.perf_counter()
    catalog = generate_catalog(calexp, config.catalog_config(calexp.shape), hosts=sci_sources,
                               seed=unit_seed(seed, visit, detector))
    # Images without a gain (drizzled, already in flux units) get their fakes without the
    # fakes' own Poisson noise: near the detection limit the sky's noise dominates anyway.
    noise = {name: known_gain(exp) is not None
             for name, exp in (("science", calexp), ("template", template_exp))}
    for name in [n for n, known in noise.items() if not known]:
        log.warning("visit %d detector %d: the %s has no gain (GAIN): fakes drawn without "
                    "their Poisson noise", visit, detector, name)
    science, drawn = inject(calexp, catalog, seed=seed, visit=visit, detector=detector,
                            target="science", noise=noise["science"])
    del calexp
    template_exp, drawn_tmpl = inject(template_exp, catalog, seed=seed, visit=visit,
                                      detector=detector, target="template",
                                      noise=noise["template"])
    injected = merge_injected(drawn, drawn_tmpl)
    timings["inject"] = time.perf_counter() - start

    pair = run_pair(science, template_exp, config.run.model_copy(update={"seed": seed}))
    timings.update(pair.timings)
    start = time.perf_counter()
    difference = pair.diffim.difference
    match = match_fakes(injected, pair.dia_sources, difference, config.match, visit=visit,
                        detector=detector)
    real = _real_ids(pair.dia_sources, match.table, truth,
                     config.real_radius_arcsec / _pixel_scale(difference))
    timings["match"] = time.perf_counter() - start

    start = time.perf_counter()
    # The images are hashed as they are written; the small tables after.
    checksums = {name: write_exposure(exposure, folder / name) for name, exposure in (
        ("science.fits", pair.science), ("template.fits", pair.template),
        ("difference.fits", difference))}
    write_parquet(injected, folder / "fakes.parquet")
    write_parquet(pair.dia_sources, folder / "diaSources.parquet")
    write_parquet(match.table, folder / "matched.parquet")
    timings["write"] = time.perf_counter() - start
    info = difference.visit_info
    return {
        "mjd": float(info.mjd) if info is not None else float("nan"),
        "band": info.band if info is not None else "",
        "timings": timings,
        "n_fakes": len(injected), "n_fakes_drawn": int((injected["injection_flag"] == 0).sum()),
        "n_matched": int(match.table["matched"].sum()),
        "n_dia_sources": len(pair.dia_sources), "n_sci_sources": len(sci_sources),
        "chance_fraction": match.chance_fraction, "real_ids": real,
        "area_deg2": difference.width * difference.height
        * (_pixel_scale(difference) / 3600.0) ** 2,
        "calibration": {"psf_fwhm": q.get("psf_fwhm_px", np.nan) * _pixel_scale(difference),
                        "astrom_scatter": q.get("astrometric_scatter_mas", np.nan),
                        "zero_point_error": q.get("zero_point_err_mmag", np.nan)},
        "diffim": {k: pair.quality[k] for k in ("noise_ratio", "residual_footprint_ratio",
                                                "template_coverage") if k in pair.quality},
        "checksums": {**checksums, **_checksums(folder, ["fakes.parquet",
                                                         "diaSources.parquet",
                                                         "matched.parquet"])},
        "checksum_algorithm": CHECKSUM,
    }


def _pixel_scale(exposure: Exposure) -> float:
    """Pixel scale (arcsec) at the centre, from the WCS."""
    return float(np.sqrt(abs(np.linalg.det(exposure.wcs.pixel_scale_matrix))) * 3600.0)


def run_unit(source: DatasetSource, config: InjectRunConfig, seed: int, visit: int,
             detector: int, out: str, template: dict, resume: bool = False) -> dict:
    """Run one science visit-detector and record it in its ``unit.json``.

    Returns
    -------
    dict
        The unit record: ``status`` (done | failed | skipped when ``resume`` found it finished
        from the same inputs with valid checksums), ``inputs_key``, ``error``, ``timings`` (s
        per stage), ``wall``, ``cpu``, ``started`` and ``finished`` (Unix time),
        ``peak_rss_bytes`` (of the process that ran it), counts, quality numbers, checksums.
    """
    folder = unit_dir(Path(out), visit, detector)
    own_seed = unit_seed(seed, visit, detector)
    key = inputs_key(source, config, "unit", visit, detector, own_seed, template.get("checksums"))
    if resume:
        record = finished(folder, key)
        if record is not None:
            return {**record, "status": "skipped"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / UNIT_FILE).unlink(missing_ok=True)
    (folder / "error.log").unlink(missing_ok=True)
    base = {"visit": visit, "detector": detector, "seed": own_seed, "inputs_key": key}
    started = time.time()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with _one_blas_thread():
            record = {**base, "status": "done", "error": None,
                      **_process_unit(source, config, seed, visit, detector, folder, template)}
    except Exception as exc:  # isolate the unit: record why it failed, let the others go on
        (folder / "error.log").write_text(traceback.format_exc())
        record = {**base, "status": "failed", "error": _one_line(exc)}
    record.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                  started=started, finished=time.time(), peak_rss_bytes=peak_rss_bytes())
    write_json(record, folder / UNIT_FILE)
    return record
