"""Image differencing from end to end: prepare both images, align, subtract, assess.

``prepare_exposure`` gives an image what differencing needs (background removed, a PSF model);
``subtract`` warps the template onto the science grid when the grids differ, runs Alard-Lupton
or ZOGY and adds the quality numbers every algorithm shares.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.log import get_logger
from apqa.pipeline.characterize import CharacterizeConfig, characterize
from apqa.pipeline.diffim.al import AlConfig, DiffimResult, al_subtract
from apqa.pipeline.diffim.warp import WarpConfig, is_aligned, warp_exposure
from apqa.pipeline.diffim.zogy import ZogyConfig, zogy_subtract
from apqa.pipeline.isr import IsrConfig, run_isr

log = get_logger(__name__)


class DiffConfig(ConfigModel):
    """Settings of ``apqa diff``: the algorithm and each stage it uses."""

    algorithm: Literal["al", "zogy"] = "al"
    al: AlConfig = Field(default_factory=AlConfig)
    zogy: ZogyConfig = Field(default_factory=ZogyConfig)
    warp: WarpConfig = Field(default_factory=WarpConfig)
    # One pass at S/N 10 without deblending finds what differencing needs (PSF stars with
    # S/N > 30, kernel candidates with S/N > 10) at a fraction of a full characterization.
    characterize: CharacterizeConfig = Field(
        default_factory=lambda: CharacterizeConfig(n_iterations=1, detection_threshold=10.0,
                                                   deblend_contrast=1.0, detection_binning=2))
    isr: IsrConfig = Field(default_factory=IsrConfig)


def prepare_exposure(exposure: Exposure, config: DiffConfig | None = None
                     ) -> tuple[Exposure, pd.DataFrame | None]:
    """Background-subtracted exposure with a PSF model, and its sources when measured here.

    An apqa calexp (``OBSTYPE = 'calexp'``, as ``apqa process`` writes) is used as it is; any
    other image goes through ISR (masks, cosmic rays; no bias or flat) and characterization.
    """
    config = config or DiffConfig()
    if str(exposure.metadata.get("OBSTYPE", "")).lower() == "calexp" and exposure.psf:
        return exposure, None
    isr = run_isr(exposure, config=config.isr)
    result = characterize(isr.exposure, config.characterize)
    return result.exposure, result.sources[["x", "y", "snr"]]


def _noise_ratio(difference: Exposure, science: Exposure, template: Exposure) -> float:
    """Robust std of D / sqrt(var) over pixels no source touches (DETECTED in neither)."""
    planes = ["DETECTED", "NO_DATA", "SAT", "BAD", "CR", "INTRP"]
    busy = science.mask.is_set(planes) | template.mask.is_set(planes)
    busy |= difference.mask.is_set(["NO_DATA", "SAT", "BAD"])
    good = ~busy & np.isfinite(difference.variance) & (difference.variance > 0)
    if good.sum() < 100:
        return float("nan")
    z = difference.image[good] / np.sqrt(difference.variance[good])
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def prepare_pair(science: Exposure, template: Exposure, config: DiffConfig | None = None
                 ) -> tuple[Exposure, Exposure, pd.DataFrame | None]:
    """:func:`prepare_exposure` on both images at once (two threads: the heavy numpy, scipy
    and sep calls release the GIL), returning the science sources too."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        sci_future = pool.submit(prepare_exposure, science, config)
        tpl_future = pool.submit(prepare_exposure, template, config)
        (sci, sources), (tpl, _) = sci_future.result(), tpl_future.result()
    return sci, tpl, sources


def subtract(science: Exposure, template: Exposure, config: DiffConfig | None = None,
             science_sources: pd.DataFrame | None = None
             ) -> tuple[DiffimResult, np.ndarray | None]:
    """Difference of two prepared exposures (see :func:`prepare_exposure`).

    ``science_sources`` (x, y, snr), when known, give AL its kernel candidates without another
    detection pass. Returns the result (difference exposure and quality numbers) and, for
    ZOGY, the score image S_corr (None for AL).
    """
    config = config or DiffConfig()
    if science.visit_info and template.visit_info and \
            science.visit_info.band != template.visit_info.band:
        log.warning("science band %r differs from template band %r: differencing anyway",
                    science.visit_info.band, template.visit_info.band)
    coverage = 1.0
    if not is_aligned(template, science):
        warped = warp_exposure(template, science.wcs, science.shape, config.warp)
        template, coverage = warped.exposure, warped.coverage
    score = None
    if config.algorithm == "al":
        result = al_subtract(science, template, config.al, candidates=science_sources)
    else:
        zogy = zogy_subtract(science, template, config.zogy)
        result = DiffimResult(zogy.difference, dict(zogy.quality))
        score = zogy.score
    result.quality["template_coverage"] = coverage
    result.template = template
    # ZOGY may rescale its variance plane to the measured noise: its own noise_ratio is the
    # one before rescaling and stays; the ratio of the final product is reported beside it.
    measured = _noise_ratio(result.difference, science, template)
    result.quality.setdefault("noise_ratio", measured)
    result.quality["noise_ratio_final"] = measured
    return result, score
