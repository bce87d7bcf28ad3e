"""A simulated survey: the plan, the sky, and writing a dataset to disk with its manifest.

Everything is deterministic for a seed. Each random stream has its own seed derived from the
master seed, so that one visit-detector's noise never depends on which others were simulated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from apqa import __version__
from apqa.config import config_hash
from apqa.datamodel import Exposure, Mask
from apqa.errors import ConfigError, InputError
from apqa.sim.config import SimulationConfig
from apqa.sim.datasets import DatasetSpec, get_dataset
from apqa.sim.exposure import SimulatedExposure, simulate_exposure
from apqa.sim.field import (
    SkyField,
    VisitPlan,
    covered_region,
    make_sky,
    plan_visits,
)
from apqa.sim.instrument import DetectorCalibration, make_detector_calibration

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Stream labels for SeedSequence: one independent stream per purpose.
_PLAN, _SKY, _DETECTOR, _EXPOSURE = range(1, 5)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _with_overrides(spec: DatasetSpec, overrides: dict[str, float]) -> DatasetSpec:
    """The dataset spec with some numeric parameters replaced (unknown names are errors)."""
    numeric = {f.name for f in fields(spec) if isinstance(getattr(spec, f.name), int | float)}
    unknown = sorted(set(overrides) - numeric)
    if unknown:
        raise ConfigError(f"spec_overrides: unknown dataset parameters {unknown}; expected "
                          f"some of {sorted(numeric)}")
    typed = {k: type(getattr(spec, k))(v) for k, v in overrides.items()}
    return replace(spec, **typed)


class SurveySimulator:
    """Simulate an embedded dataset.

    Examples
    --------
    >>> sim = SurveySimulator(SimulationConfig(dataset="hits-sim", n_visits=2))
    >>> [p.visit for p in sim.plans]
    [400001, 410001, 410002]
    """

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.spec: DatasetSpec = _with_overrides(get_dataset(config.dataset),
                                                 config.spec_overrides)
        self.plans: list[VisitPlan] = plan_visits(
            self.spec, config.n_visits, config.n_template_visits, config.seed, _PLAN)
        self._calibs: dict[int, DetectorCalibration] = {}

    @property
    def detectors(self) -> list[int]:
        return list(range(1, self.config.n_detectors + 1))

    def plan(self, visit: int) -> VisitPlan:
        for plan in self.plans:
            if plan.visit == visit:
                return plan
        raise InputError(f"visit {visit}: not in this dataset's plan "
                         f"({[p.visit for p in self.plans]})")

    @cached_property
    def sky(self) -> SkyField:
        region = covered_region(self.spec, self.plans, self.config.n_detectors)
        return make_sky(self.spec, self.plans, region, self.config.seed, _SKY)

    @cached_property
    def refcat(self) -> pd.DataFrame:
        return self.sky.refcat

    def calibration(self, detector: int) -> DetectorCalibration:
        if detector not in self._calibs:
            self._calibs[detector] = make_detector_calibration(
                self.spec.camera, detector, self.spec.n_bad_columns,
                _rng(self.config.seed, _DETECTOR, detector))
        return self._calibs[detector]

    def exposure(self, visit: int, detector: int) -> SimulatedExposure:
        """Simulate one visit-detector (deterministic in seed, visit and detector)."""
        if detector not in self.detectors:
            raise InputError(f"detector {detector}: expected one of {self.detectors}")
        return simulate_exposure(self.spec, self.plan(visit), detector, self.sky,
                                 self.calibration(detector),
                                 _rng(self.config.seed, _EXPOSURE, visit, detector))

    def calib_exposures(self, detector: int) -> tuple[Exposure, Exposure]:
        """Master bias and master flat of a detector as exposures (BAD set on defects)."""
        cam, calib = self.spec.camera, self.calibration(detector)
        bias_var = np.full(calib.bias.shape, (cam.read_noise / cam.gain) ** 2 / 20, np.float32)
        bias = Exposure(calib.master_bias, bias_var)
        bias.metadata["OBSTYPE"] = ("bias", "master bias, ADU")
        mask = Mask.zeros(calib.bias.shape)
        for row in calib.defects.itertuples():
            mask.array[row.y0:row.y1 + 1, row.x0:row.x1 + 1] |= mask.bitmask("BAD")
        flat = Exposure(calib.master_flat, np.full(calib.bias.shape, 1e-6, np.float32), mask)
        flat.metadata["OBSTYPE"] = ("flat", "master flat, normalized to mean 1")
        flat.metadata["BAND"] = self.spec.band
        return bias, flat

    def write(self, out_dir: str | Path, overwrite: bool = False,
              progress: Callable[[str], None] | None = None) -> Path:
        """Write the dataset into ``out_dir`` and return the manifest path.

        Files are written into a temporary folder next to ``out_dir`` and moved into place at the
        end, so an interrupted run leaves nothing under ``out_dir``.
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise InputError(f"{out_dir}: output folder exists and is not empty "
                             "(use --overwrite to replace it)")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        tmp.chmod(0o755)
        try:
            manifest = self._write_into(tmp, progress or (lambda _: None))
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return out_dir / MANIFEST_NAME

    def _write_into(self, root: Path, progress: Callable[[str], None]) -> dict:
        spec, cfg = self.spec, self.config
        for sub in ("raw", "calib", "truth"):
            (root / sub).mkdir()
        calibs = {}
        for det in self.detectors:
            bias, flat = self.calib_exposures(det)
            names = {"bias": f"calib/bias_{det:02d}.fits",
                     "flat": f"calib/flat_{spec.band}_{det:02d}.fits",
                     "defects": f"calib/defects_{det:02d}.parquet"}
            bias.write_fits(root / names["bias"])
            flat.write_fits(root / names["flat"])
            self.calibration(det).defects.to_parquet(root / names["defects"], index=False)
            calibs[det] = names

        exposures, sources, visits, crs = [], [], [], []
        for plan in self.plans:
            for det in self.detectors:
                sim = self.exposure(plan.visit, det)
                raw_name = f"raw/raw_{plan.visit}_{det:02d}.fits"
                sim.raw.write_fits(root / raw_name)
                entry = {"visit": plan.visit, "detector": det, "is_template": plan.is_template,
                         "mjd": plan.mjd, "band": spec.band, "raw": raw_name, **calibs[det]}
                if cfg.write_noiseless:
                    model = Exposure(sim.expected_electrons / np.float32(spec.camera.gain)
                                     + self.calibration(det).bias,
                                     np.zeros_like(sim.expected_electrons))
                    entry["noiseless"] = f"truth/model_{plan.visit}_{det:02d}.fits"
                    model.write_fits(root / entry["noiseless"])
                exposures.append(entry)
                sources.append(sim.truth_sources)
                visits.append(sim.truth_visit)
                crs.append(sim.cosmic_rays)
                progress(f"visit {plan.visit} detector {det}")

        self.refcat.to_parquet(root / "refcat.parquet", index=False)
        self.sky.objects_table().to_parquet(root / "truth/objects.parquet", index=False)
        pd.concat(sources, ignore_index=True).to_parquet(root / "truth/sources.parquet",
                                                         index=False)
        pd.DataFrame(visits).to_parquet(root / "truth/visits.parquet", index=False)
        pd.concat(crs, ignore_index=True).to_parquet(root / "truth/cosmic_rays.parquet",
                                                     index=False)
        cam = spec.camera
        return {
            "manifest_version": MANIFEST_VERSION,
            "dataset": spec.name,
            "description": spec.description,
            "apqa_version": __version__,
            "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg),
            "seed": cfg.seed,
            "band": spec.band,
            "physical_filter": spec.physical_filter,
            "camera": {"name": cam.name, "width": cam.width, "height": cam.height,
                       "pixel_scale": cam.pixel_scale, "gain": cam.gain,
                       "read_noise": cam.read_noise, "full_well": cam.full_well},
            "refcat": "refcat.parquet",
            "truth": {"objects": "truth/objects.parquet", "sources": "truth/sources.parquet",
                      "visits": "truth/visits.parquet",
                      "cosmic_rays": "truth/cosmic_rays.parquet"},
            "science_visits": [p.visit for p in self.plans if not p.is_template],
            "template_visits": [p.visit for p in self.plans if p.is_template],
            "detectors": self.detectors,
            "exposures": exposures,
        }


def load_manifest(path: str | Path) -> dict:
    """Read a dataset manifest (a folder or the manifest file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{path}: dataset manifest not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: manifest is not valid JSON ({exc})") from None
    for key in ("dataset", "exposures"):
        if key not in manifest:
            raise InputError(f"{path}: manifest lacks the '{key}' field")
    return manifest
