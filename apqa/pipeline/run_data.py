"""Where ``apqa inject-and-run`` gets its pixels: an embedded dataset simulated on demand, or a
folder with a ``manifest.json``.

A :class:`DatasetSource` is small and picklable (Dask ships it to worker processes); each
process builds its simulator or reads its manifest once (cached).

Folder manifest (the simulator's ``apqa simulate`` output is one)::

    {"dataset": "my-field",
     "refcat": "refcat.parquet",                      # optional, Gaia DR3 column names
     "magzero": 30.0,                                 # optional, for images without MAGZERO
     "band": "K",                                     # optional, for filters like F200W
     "exposures": [                                   # one entry per visit-detector
       {"visit": 1, "detector": 1, "is_template": true, "raw": "ref.fits"},
       {"visit": 2, "detector": 1, "is_template": false, "mjd": 60000.1, "raw": "new.fits",
        "bias": "bias.fits", "flat": "flat.fits", "defects": "defects.parquet",
        "psf": "new_psf.fits"}],                      # optional PSF image (apqa diff's
                                                      # --science-psf): replaces the fit
     "truth": {"sources": "truth/sources.parquet"}}   # optional: real transients (visit,
                                                      # detector, kind, x, y)

Paths are relative to the folder. ``raw`` is an apqa raw exposure (then ``bias`` is needed) or a
reduced plain FITS image (header WCS, GAIN, RDNOISE, SATURATE, MAGZERO, EXPTIME, FILTER,
MJD-OBS). The manifest's ``visit``, ``detector``, ``mjd``, ``band`` and ``magzero`` (the last two
per entry or for the dataset) replace what the files' headers say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from apqa.datamodel import Exposure, Mask, PhotoCalib
from apqa.datamodel.apdb_schema import require_apdb_band
from apqa.datamodel.psf import Psf
from apqa.datamodel.psf_file import read_psf_image
from apqa.errors import InputError
from apqa.log import get_logger
from apqa.sim.config import SimulationConfig
from apqa.sim.survey import MANIFEST_NAME, SurveySimulator, load_manifest

log = get_logger(__name__)

EMBEDDED = ("hits-sim", "cosmos-sim", "crowded-sim")
#: Truth kinds that really change between template and science: DiaSources on them are real.
REAL_KINDS = ("transient", "asteroid")


@dataclass(frozen=True)
class UnitInputs:
    """One visit-detector's raw pixels and calibrations, and the truth when known."""

    raw: Exposure
    bias: Exposure | None
    flat: Exposure | None
    defects: pd.DataFrame | None
    truth: pd.DataFrame | None
    psf: Psf | None = None  # a PSF model the manifest gives, instead of the fitted one


@dataclass(frozen=True)
class DatasetSource:
    """An embedded dataset (``sim`` set) or a manifest folder (``path`` set).

    ``crop`` = (x0, y0, width, height) processes only that part of every detector (quick looks
    and tests); None processes whole detectors.
    """

    name: str
    sim: SimulationConfig | None = None
    path: str | None = None
    crop: tuple[int, int, int, int] | None = None

    @classmethod
    def resolve(cls, dataset: str, n_visits: int, n_detectors: int, seed: int,
                crop: tuple[int, int, int, int] | None = None,
                spec_overrides: dict[str, float] | None = None) -> DatasetSource:
        """An embedded dataset by name (``spec_overrides`` as in :class:`SimulationConfig`),
        else a folder holding ``manifest.json``."""
        if dataset in EMBEDDED:
            return cls(dataset, sim=SimulationConfig(
                dataset=dataset, n_visits=n_visits, n_detectors=n_detectors, seed=seed,
                spec_overrides=spec_overrides or {}), crop=crop)
        folder = Path(dataset)
        if not folder.is_dir():
            raise InputError(f"--dataset {dataset}: neither an embedded dataset "
                             f"({', '.join(EMBEDDED)}) nor a folder")
        manifest = _manifest(str(folder.resolve()))
        return cls(str(manifest["dataset"]), path=str(folder.resolve()), crop=crop)

    # -- the plan --------------------------------------------------------------------------------
    def exposures(self) -> list[dict]:
        """Manifest-style entries (visit, detector, is_template, mjd) of every exposure."""
        if self.sim is not None:
            sim = _simulator(self.sim)
            return [{"visit": p.visit, "detector": d, "is_template": p.is_template,
                     "mjd": p.mjd} for p in sim.plans for d in sim.detectors]
        entries = _manifest(self.path)["exposures"]
        for i, entry in enumerate(entries):
            missing = [k for k in ("visit", "detector", "is_template", "raw") if k not in entry]
            if missing:
                raise InputError(f"{self.path}/manifest.json: exposures[{i}] lacks {missing}")
        return entries

    def plan(self, n_visits: int | None = None, n_detectors: int | None = None
             ) -> tuple[dict[int, int], list[tuple[int, int, float]]]:
        """Template visit per detector and the science (visit, detector, mjd) units in time
        order: the first ``n_visits`` science visits and ``n_detectors`` detectors (all when
        None)."""
        entries = self.exposures()
        mjd = {int(e["visit"]): float(e.get("mjd", 0.0)) for e in entries}
        visits = sorted({int(e["visit"]) for e in entries if not e["is_template"]},
                        key=lambda v: (mjd[v], v))[:n_visits]
        detectors = sorted({int(e["detector"]) for e in entries})[:n_detectors]
        templates: dict[int, int] = {}
        for e in entries:
            if e["is_template"]:
                templates.setdefault(int(e["detector"]), int(e["visit"]))
        units = sorted(((int(e["visit"]), int(e["detector"]), mjd[int(e["visit"])])
                        for e in entries if not e["is_template"]
                        and int(e["visit"]) in visits and int(e["detector"]) in detectors),
                       key=lambda u: (u[2], u[0], u[1]))
        no_template = sorted({d for _, d, _ in units} - set(templates))
        if no_template:
            raise InputError(f"dataset {self.name}: no template exposure for detectors "
                             f"{no_template} (manifest entries with is_template true)")
        if not units:
            raise InputError(f"dataset {self.name}: no science exposures (manifest entries "
                             "with is_template false)")
        return templates, units

    # -- pixels ----------------------------------------------------------------------------------
    def refcat(self) -> pd.DataFrame | None:
        """The reference catalog, if the dataset has one."""
        if self.sim is not None:
            return _simulator(self.sim).refcat
        name = _manifest(self.path).get("refcat")
        return _read_parquet(Path(self.path) / name) if name else None

    def load(self, visit: int, detector: int) -> UnitInputs:
        """Raw exposure, calibrations and truth of one visit-detector (cropped if asked)."""
        if self.sim is not None:
            sim = _simulator(self.sim)
            exposure = sim.exposure(visit, detector)
            bias, flat = sim.calib_exposures(detector)
            inputs = UnitInputs(exposure.raw, bias, flat, sim.calibration(detector).defects,
                                exposure.truth_sources)
        else:
            inputs = self._load_files(visit, detector)
        return inputs if self.crop is None else _crop_inputs(inputs, self.crop)

    def _load_files(self, visit: int, detector: int) -> UnitInputs:
        root = Path(self.path)
        entry = next((e for e in self.exposures() if int(e["visit"]) == visit
                      and int(e["detector"]) == detector), None)
        if entry is None:
            raise InputError(f"{root}/manifest.json: no exposure for visit {visit} detector "
                             f"{detector}")
        manifest = _manifest(self.path)
        raw = _as_listed(Exposure.from_fits(root / entry["raw"]), entry,
                         f"{root}/manifest.json", entry.get("magzero", manifest.get("magzero")),
                         manifest.get("band"))
        bias = Exposure.from_fits(root / entry["bias"], require_wcs=False) \
            if entry.get("bias") else None
        flat = Exposure.from_fits(root / entry["flat"], require_wcs=False) \
            if entry.get("flat") else None
        defects = _read_parquet(root / entry["defects"]) if entry.get("defects") else None
        truth = None
        sources = _manifest(self.path).get("truth", {}).get("sources")
        if sources and (root / sources).is_file():
            table = _read_parquet(root / sources)
            if {"visit", "detector"} <= set(table.columns):
                truth = table[(table["visit"] == visit) & (table["detector"] == detector)]
        psf = read_psf_image(root / entry["psf"]) if entry.get("psf") else None
        return UnitInputs(raw, bias, flat, defects, truth, psf)


def _as_listed(exposure: Exposure, entry: dict, manifest: str, magzero: float | None = None,
               dataset_band: str | None = None) -> Exposure:
    """The exposure with the manifest's visit, detector and (when given) mjd, band and zero
    point: the run plans, associates and names its outputs by those, whatever the file's
    header says (plain FITS often carry no visit number, the camera's CCD number, no MAGZERO,
    a filter name longer than the APDB's band)."""
    info = exposure.visit_info
    if info is None:
        return exposure
    mjd = float(entry["mjd"]) if entry.get("mjd") is not None else info.mjd
    if np.isfinite(info.mjd) and abs(info.mjd - mjd) * 86400.0 > 1.0:
        log.warning("%s: visit %s detector %s: mjd %.6f replaces the header's %.6f",
                    manifest, entry["visit"], entry["detector"], mjd, info.mjd)
    band = require_apdb_band(str(entry.get("band", dataset_band or info.band)),
                             info.physical_filter,
                             f"{manifest}: visit {entry['visit']} detector {entry['detector']}",
                             'give "band" (e.g. "K") in the manifest entry or for the dataset')
    exposure = replace(exposure, visit_info=replace(info, visit=int(entry["visit"]),
                                                    detector=int(entry["detector"]), mjd=mjd,
                                                    band=band))
    if magzero is not None:
        try:
            exposure.photo_calib = PhotoCalib.from_zero_point(float(magzero))
        except (TypeError, ValueError):
            raise InputError(f"{manifest}: visit {entry['visit']} detector "
                             f"{entry['detector']}: magzero {magzero!r} is not a number "
                             "(expected a magnitude zero point of the image's counts)") from None
    return exposure


def _simulator(config: SimulationConfig) -> SurveySimulator:
    return _simulator_from_json(config.model_dump_json())


@cache
def _simulator_from_json(config: str) -> SurveySimulator:
    """One simulator per process and configuration (its sky is built once)."""
    return SurveySimulator(SimulationConfig.model_validate_json(config))


def _manifest(path: str) -> dict:
    """The folder's manifest, read once per version of the file (a process that runs again
    after the manifest was edited sees the edit)."""
    file = Path(path) / MANIFEST_NAME if Path(path).is_dir() else Path(path)
    try:
        stat = file.stat()
    except OSError:
        return load_manifest(path)  # the error that names the missing file
    return _manifest_version(path, stat.st_mtime_ns, stat.st_size)


@cache
def _manifest_version(path: str, mtime_ns: int, size: int) -> dict:
    return load_manifest(path)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Parquet table ({exc})") from None


def crop_exposure(exposure: Exposure, x0: int, y0: int, width: int, height: int) -> Exposure:
    """The part ``[y0:y0+height, x0:x0+width]`` of an exposure, with its WCS shifted to match.

    Examples
    --------
    >>> exp = Exposure(np.arange(12.0).reshape(3, 4), np.ones((3, 4)))
    >>> crop_exposure(exp, 1, 1, 2, 2).image.tolist()
    [[5.0, 6.0], [9.0, 10.0]]
    """
    if x0 < 0 or y0 < 0 or x0 + width > exposure.width or y0 + height > exposure.height:
        raise InputError(f"crop {[x0, y0, width, height]}: outside the {exposure.width}x"
                         f"{exposure.height} detector")
    sl = (slice(y0, y0 + height), slice(x0, x0 + width))
    mask = Mask(exposure.mask.array[sl].copy(), exposure.mask.planes)
    wcs = exposure.wcs[sl] if exposure.wcs is not None else None
    return replace(exposure, image=exposure.image[sl].copy(),
                   variance=exposure.variance[sl].copy(), mask=mask, wcs=wcs,
                   metadata=exposure.metadata.copy())


def _crop_inputs(inputs: UnitInputs, crop: tuple[int, int, int, int]) -> UnitInputs:
    x0, y0, width, height = crop
    defects = inputs.defects
    if defects is not None:
        # keep the defects that overlap the crop, in the crop's pixel coordinates
        inside = ((defects["x1"] >= x0) & (defects["x0"] < x0 + width)
                  & (defects["y1"] >= y0) & (defects["y0"] < y0 + height))
        defects = defects[inside].copy()
        for lo, hi, start, size in (("x0", "x1", x0, width), ("y0", "y1", y0, height)):
            defects[lo] = np.clip(defects[lo] - start, 0, size - 1)
            defects[hi] = np.clip(defects[hi] - start, 0, size - 1)
        defects = defects.reset_index(drop=True)
    truth = inputs.truth
    if truth is not None:
        truth = truth.assign(x=truth["x"] - x0, y=truth["y"] - y0)
    return UnitInputs(crop_exposure(inputs.raw, *crop),
                      None if inputs.bias is None else crop_exposure(inputs.bias, *crop),
                      None if inputs.flat is None else crop_exposure(inputs.flat, *crop),
                      defects, truth, inputs.psf)
