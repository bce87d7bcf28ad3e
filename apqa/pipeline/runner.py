"""The runner: the one place where pipeline stages meet.

:func:`run_pair` takes a science and a template exposure through preparation (ISR and
characterization when they are not calexps yet), differencing, DIASource detection and
measurement, timing each stage and recording the process's peak memory.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.datamodel.psf import Psf
from apqa.pipeline.alert_production import AlertProductionConfig
from apqa.pipeline.detect import DiaDetectionConfig, detect_dia_sources
from apqa.pipeline.diffim.al import DiffimResult
from apqa.pipeline.diffim.subtract import DiffConfig, prepare_pair, subtract
from apqa.pipeline.measure import MeasureConfig, measure_dia_sources


class RunConfig(ConfigModel):
    """Settings of ``apqa run``: differencing, detection and measurement."""

    diff: DiffConfig = Field(default_factory=DiffConfig)
    detection: DiaDetectionConfig = Field(default_factory=DiaDetectionConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    alerts: AlertProductionConfig = Field(default_factory=AlertProductionConfig)
    seed: int = Field(0, ge=0, description="seed of the sky-source positions")


@dataclass
class PairResult:
    """Everything :func:`run_pair` produced."""

    dia_sources: pd.DataFrame
    sky_sources: pd.DataFrame
    diffim: DiffimResult
    science: Exposure
    template: Exposure
    score: np.ndarray | None
    quality: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def run_pair(science: Exposure, template: Exposure, config: RunConfig | None = None,
             on_stage: Callable[[str], None] | None = None,
             psfs: tuple[Psf | None, Psf | None] = (None, None)) -> PairResult:
    """Difference a science exposure against a template and measure its DIASources.

    Parameters
    ----------
    science, template
        Raw-ish images (plain FITS or apqa exposures: ISR and characterization run here) or
        calexps from ``apqa process`` (used as they are). The template is warped onto the
        science grid when the grids differ.
    config
        :class:`RunConfig`.
    on_stage
        Called with each stage's name as it starts (progress display).
    psfs
        PSF models for the science and the template that replace their own (None: fitted or
        stored), e.g. read with :func:`~apqa.datamodel.psf_file.read_psf_image`.

    Returns
    -------
    PairResult
        The APDB DiaSource table, sky-source photometry, the difference and its quality
        numbers, per-stage wall times and peak memory.
    """
    config = config or RunConfig()
    notify = on_stage or (lambda _name: None)
    timings: dict[str, float] = {}
    notify("prepare")
    with _timed(timings, "prepare"):
        science, template, sources = prepare_pair(science, template, config.diff, psfs)
    notify("difference")
    with _timed(timings, "difference"):
        diffim, score = subtract(science, template, config.diff, science_sources=sources)
    notify("detect")
    with _timed(timings, "detect"):
        detections = detect_dia_sources(diffim.difference, config.detection, score=score,
                                        seed=config.seed)
    notify("measure")
    with _timed(timings, "measure"):
        measured = measure_dia_sources(detections, diffim.difference, science,
                                       diffim.template, config.measure)
    quality = dict(diffim.quality)
    sky = measured.sky_sources
    if len(sky) >= 10:
        pull = (sky["psfFlux"] / sky["psfFluxErr"]).to_numpy()
        quality["sky_source_pull_std"] = float(
            1.4826 * np.median(np.abs(pull - np.median(pull))))
    quality["n_dia_sources"] = float(len(measured.dia_sources))
    quality["n_negative"] = float(measured.dia_sources["isNegative"].sum())
    quality["n_dipoles"] = float(measured.dia_sources["isDipole"].sum())
    aligned = diffim.template if diffim.template is not None else template
    return PairResult(dia_sources=measured.dia_sources, sky_sources=sky, diffim=diffim,
                      science=science, template=aligned, score=score, quality=quality,
                      timings=timings, suppressed=measured.suppressed,
                      peak_rss_bytes=peak_rss_bytes())
