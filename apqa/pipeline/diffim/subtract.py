"""Image differencing from end to end: prepare both images, align, subtract, assess.

``prepare_exposure`` gives an image what differencing needs (background removed, a PSF model);
``subtract`` warps the template onto the science grid when the grids differ, runs Alard-Lupton
or ZOGY and adds the quality numbers every algorithm shares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.datamodel.columns import Columns
from apqa.datamodel.psf import Psf
from apqa.errors import InputError
from apqa.log import get_logger
from apqa.pipeline.diffim.al import AlConfig, DiffimResult, al_subtract
from apqa.pipeline.diffim.prepare import PrepareConfig, prepare_for_difference
from apqa.pipeline.diffim.warp import WarpConfig, is_aligned, warp_exposure
from apqa.pipeline.diffim.zogy import ZogyConfig, zogy_subtract
from apqa.pipeline.threads import beside, core_budget

log = get_logger(__name__)


class DiffConfig(ConfigModel):
    """Settings of ``apqa diff``: the algorithm and each stage it uses."""

    algorithm: Literal["al", "zogy"] = "al"
    al: AlConfig = Field(default_factory=AlConfig)
    zogy: ZogyConfig = Field(default_factory=ZogyConfig)
    warp: WarpConfig = Field(default_factory=WarpConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)


def prepare_exposure(exposure: Exposure, config: DiffConfig | None = None,
                     overwrite_input: bool = False, psf: Psf | None = None
                     ) -> tuple[Exposure, Columns | None]:
    """Background-subtracted exposure with a PSF model, and its sources when measured here.

    An apqa calexp (``OBSTYPE = 'calexp'``, as ``apqa process`` writes) or a template warped
    from one (``'warp'``) is used as it is; any
    other reduced image gets the light preparation of
    :func:`~apqa.pipeline.diffim.prepare.prepare_for_difference` (sky, saturation, cosmic
    rays, source footprints, PSF model), in the input's own planes with ``overwrite_input``.
    A ``psf`` given replaces the image's own model (fitted or stored).

    Raises
    ------
    InputError
        For a raw apqa exposure (it needs bias and flat: ``apqa process`` first).
    """
    config = config or DiffConfig()
    obstype = str(exposure.metadata.get("OBSTYPE", "")).lower()
    if obstype in ("calexp", "warp") and exposure.psf:  # already prepared
        if psf is not None:
            exposure.psf = psf
        return exposure, None
    if obstype == "raw":
        raise InputError("raw exposure (OBSTYPE='raw'): calibrate it first with apqa process "
                         "(it needs a bias and a flat)")
    prepared = prepare_for_difference(exposure, config.prepare, overwrite_input, psf)
    return prepared.exposure, prepared.sources


def _noise_ratio(difference: Exposure, science: Exposure, template: Exposure) -> float:
    """Robust std of D / sqrt(var) over pixels no source touches (DETECTED in neither).

    Every 4th pixel in each direction: a million pixels pin the ratio to 0.1%.
    """
    planes = ["DETECTED", "NO_DATA", "SAT", "BAD", "CR", "INTRP", "EDGE"]
    step = (slice(None, None, 4), slice(None, None, 4))
    busy = ((science.mask.array[step] | template.mask.array[step] | difference.mask.array[step])
            & difference.mask.bitmask(planes)) != 0
    variance = difference.variance[step]
    good = ~busy & np.isfinite(variance) & (variance > 0)
    if good.sum() < 100:
        return float("nan")
    z = difference.image[step][good] / np.sqrt(variance[good])
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def prepare_pair(science: Exposure | Callable[[], Exposure],
                 template: Exposure | Callable[[], Exposure], config: DiffConfig | None = None,
                 psfs: tuple[Psf | None, Psf | None] = (None, None),
                 meanwhile: Callable[[], object] | None = None
                 ) -> tuple[Exposure, Exposure, Columns | None]:
    """:func:`prepare_exposure` on both images at once (two threads when the core budget
    allows, :mod:`apqa.pipeline.threads`: the heavy numpy, scipy and FFT calls release the
    GIL), returning the science sources too.

    Each image may be given as a loader (e.g. ``lambda: Exposure.from_fits(path)``), which
    then runs in the image's thread, so that reading overlaps too, and the image it returns is
    prepared in place (nobody else holds it). ``psfs`` replace the science's and the
    template's own PSF models where given. ``meanwhile`` runs on the calling thread while the
    images are prepared (``apqa diff`` imports the warp's modules there).
    """
    def load_and_prepare(image: Exposure | Callable[[], Exposure], psf: Psf | None
                         ) -> tuple[Exposure, Columns | None]:
        if isinstance(image, Exposure):
            return prepare_exposure(image, config, psf=psf)
        return prepare_exposure(image(), config, overwrite_input=True, psf=psf)

    # One after the other on a one-core budget (a Dask worker's), else side by side.
    budget = core_budget()
    with beside(budget, load_and_prepare, template, psfs[1]) as tpl_result, \
            beside(budget, load_and_prepare, science, psfs[0]) as sci_result:
        if meanwhile is not None:
            meanwhile()
        (sci, sources), (tpl, _) = sci_result.result(), tpl_result.result()
    return sci, tpl, sources


def subtract(science: Exposure, template: Exposure, config: DiffConfig | None = None,
             science_sources: Columns | None = None, with_score: bool = True
             ) -> tuple[DiffimResult, np.ndarray | None]:
    """Difference of two prepared exposures (see :func:`prepare_exposure`).

    ``science_sources`` (x, y, snr), when known, give AL its kernel candidates without another
    detection pass. Returns the result (difference exposure and quality numbers) and, for
    ZOGY with ``with_score``, the score image S_corr (None for AL).
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
        zogy = zogy_subtract(science, template, config.zogy, with_score=with_score)
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
