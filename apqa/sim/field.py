"""The survey plan (visits) and the static sky of a simulated dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from apqa.sim.camera import detector_wcs
from apqa.sim.catalogs import (
    SkyRegion,
    add_variability,
    gaia_like_errors,
    make_asteroids,
    make_galaxies,
    make_stars,
    make_transients,
)
from apqa.sim.datasets import DatasetSpec

#: Object kinds; an object id is (kind code) * 10**15 + (sky cell) * 10**6 + running index.
KIND_BASE = {"star": 1, "galaxy": 2, "transient": 3, "asteroid": 4}


@dataclass(frozen=True)
class VisitPlan:
    """One planned visit: when, where and under which conditions."""

    visit: int
    is_template: bool
    night: int
    mjd: float  # midpoint, TAI
    exptime: float
    airmass: float
    seeing: float  # arcsec FWHM at zenith-corrected airmass
    boresight_ra: float
    boresight_dec: float
    rotation: float  # degrees
    sky_mag: float  # mag / arcsec^2
    cloud_extinction: float  # mag


def night_reference_mjd(spec: DatasetSpec, night: int) -> float:
    """The reference MJD of a night (science nights >= 0, template nights < 0)."""
    if night >= 0:
        return spec.mjd_start + night * spec.night_spacing
    return spec.template_mjd + (-1 - night)


def plan_visits(spec: DatasetSpec, n_visits: int, n_templates: int, seed: int,
                stream: int) -> list[VisitPlan]:
    """Templates (deep, good seeing, a year earlier), then science visits night by night.

    Each visit's conditions come from its own random stream keyed by (seed, visit id).
    """
    plans = []
    for j in range(n_templates):
        visit = spec.first_template_visit + j
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, visit]))
        plans.append(_plan(spec, rng, visit, True, -1 - j, night_reference_mjd(spec, -1 - j),
                           spec.template_exptime, spec.template_seeing))
    for i in range(n_visits):
        visit = spec.first_visit + i
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, visit]))
        night, k = divmod(i, spec.visits_per_night)
        mjd = night_reference_mjd(spec, night) + k * 0.06
        seeing = spec.seeing_median * float(rng.lognormal(0.0, spec.seeing_spread))
        plans.append(_plan(spec, rng, spec.first_visit + i, False, night, mjd, spec.exptime,
                           float(np.clip(seeing, 0.7 * spec.seeing_median,
                                         1.8 * spec.seeing_median))))
    return plans


def _plan(spec: DatasetSpec, rng: np.random.Generator, visit: int, is_template: bool,
          night: int, mjd: float, exptime: float, seeing: float) -> VisitPlan:
    dither = rng.uniform(-spec.dither_arcsec, spec.dither_arcsec, 2) / 3600.0
    return VisitPlan(
        visit=visit, is_template=is_template, night=night, mjd=float(mjd),
        exptime=float(exptime), airmass=float(rng.uniform(1.05, 1.5)), seeing=float(seeing),
        boresight_ra=spec.field_ra + dither[0] / np.cos(np.deg2rad(spec.field_dec)),
        boresight_dec=spec.field_dec + dither[1],
        rotation=float(rng.normal(0.0, 0.02)),
        sky_mag=spec.sky_mag + float(rng.normal(0.0, 0.15)),
        cloud_extinction=float(rng.exponential(0.02)),
    )


def covered_region(spec: DatasetSpec, plans: list[VisitPlan], n_detectors: int,
                   margin_arcsec: float = 60.0) -> SkyRegion:
    """The RA/Dec box covering every detector of every visit, plus a margin."""
    cam = spec.camera
    xs = np.array([0, cam.width - 1, 0, cam.width - 1], float)
    ys = np.array([0, 0, cam.height - 1, cam.height - 1], float)
    ras, decs = [], []
    for plan in plans:
        for det in range(1, n_detectors + 1):
            wcs = detector_wcs(cam, det, plan.boresight_ra, plan.boresight_dec, plan.rotation)
            ra, dec = wcs.all_pix2world(xs, ys, 0)
            ras.append(ra)
            decs.append(dec)
    ra, dec = np.concatenate(ras), np.concatenate(decs)
    m = margin_arcsec / 3600.0
    cosd = np.cos(np.deg2rad(dec.mean()))
    return SkyRegion(ra.min() - m / cosd, ra.max() + m / cosd, dec.min() - m, dec.max() + m)


@dataclass
class SkyField:
    """Everything on the sky of one dataset; positions of stars at epoch 2016.0."""

    region: SkyRegion
    stars: pd.DataFrame
    galaxies: pd.DataFrame
    transients: pd.DataFrame
    refcat: pd.DataFrame
    asteroids: dict[int, pd.DataFrame] = field(default_factory=dict)

    def objects_table(self) -> pd.DataFrame:
        """All static objects as one truth table (asteroids are in the per-visit truth)."""
        parts = []
        for kind, df in (("star", self.stars), ("galaxy", self.galaxies),
                         ("transient", self.transients)):
            part = df.copy()
            part.insert(0, "kind", kind)
            parts.append(part)
        return pd.concat(parts, ignore_index=True).set_index("object_id", drop=False)


CELL_DEG = 0.1
_CELL_OFFSET = 100_000  # keeps SeedSequence entropy non-negative
_OBJECTS_PER_CELL = 1_000_000


def _cells(spec: DatasetSpec, region: SkyRegion) -> list[tuple[int, int, SkyRegion]]:
    """Fixed sky cells (CELL_DEG on a side at the field centre) overlapping ``region``."""
    width_ra = CELL_DEG / np.cos(np.deg2rad(spec.field_dec))
    i0 = int(np.floor((region.ra_min - spec.field_ra) / width_ra))
    i1 = int(np.floor((region.ra_max - spec.field_ra) / width_ra))
    j0 = int(np.floor((region.dec_min - spec.field_dec) / CELL_DEG))
    j1 = int(np.floor((region.dec_max - spec.field_dec) / CELL_DEG))
    return [
        (i, j, SkyRegion(spec.field_ra + i * width_ra, spec.field_ra + (i + 1) * width_ra,
                         spec.field_dec + j * CELL_DEG, spec.field_dec + (j + 1) * CELL_DEG))
        for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)
    ]


def _ids(kind: str, cell_key: int, n: int) -> np.ndarray:
    code = list(KIND_BASE).index(kind) + 1
    return code * 10**15 + cell_key * _OBJECTS_PER_CELL + np.arange(n, dtype=np.int64)


def make_sky(spec: DatasetSpec, plans: list[VisitPlan], region: SkyRegion,
             seed: int, stream: int) -> SkyField:
    """Draw the sky of a dataset cell by cell: stars, galaxies, transients, asteroids.

    Each fixed sky cell has its own random stream keyed by (seed, cell), so the sky does not
    depend on how many visits or detectors are simulated: a larger run sees the same objects.
    """
    parts: dict[str, list[pd.DataFrame]] = {
        "stars": [], "galaxies": [], "transients": [], "refcat": []}
    nights = sorted({p.night for p in plans})
    asteroids: dict[int, list[pd.DataFrame]] = {night: [] for night in nights}
    transient_window = (spec.mjd_start, spec.mjd_start + 60.0)
    for i, j, cell in _cells(spec, region):
        key = (i + _CELL_OFFSET) * 2 * _CELL_OFFSET + (j + _CELL_OFFSET)
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, key]))
        cell_key = (i + 500) * 1000 + (j + 500)
        stars = make_stars(spec, cell, rng)
        add_variability(stars, spec.variable_fraction, rng)
        stars.insert(0, "object_id", _ids("star", cell_key, len(stars)))
        galaxies = make_galaxies(spec, cell, rng)
        galaxies.insert(0, "object_id", _ids("galaxy", cell_key, len(galaxies)))
        transients = make_transients(spec, cell, galaxies, transient_window, rng)
        transients.insert(0, "object_id", _ids("transient", cell_key, len(transients)))
        idx = transients.pop("host_index").to_numpy()
        host_ids = galaxies["object_id"].to_numpy()
        transients["host_id"] = (np.where(idx >= 0, host_ids[np.clip(idx, 0, None)], -1)
                                 if len(galaxies) else np.full(len(idx), -1))
        parts["refcat"].append(reference_catalog(spec, stars, rng))
        parts["stars"].append(stars)
        parts["galaxies"].append(galaxies)
        parts["transients"].append(transients)
        for night in nights:
            night_rng = np.random.default_rng(
                np.random.SeedSequence([seed, stream, key, night + 1000]))
            ast = make_asteroids(spec, cell, night_reference_mjd(spec, night), night_rng)
            ast.insert(0, "object_id", _ids("asteroid", cell_key, len(ast))
                       + (night + 1000) * 10_000)
            asteroids[night].append(ast)
    return SkyField(
        region,
        *(pd.concat(parts[name], ignore_index=True) for name in ("stars", "galaxies",
                                                                 "transients", "refcat")),
        asteroids={night: pd.concat(dfs, ignore_index=True) for night, dfs in asteroids.items()},
    )


def reference_catalog(spec: DatasetSpec, stars: pd.DataFrame,
                      rng: np.random.Generator) -> pd.DataFrame:
    """A Gaia-DR3-like reference catalog of the brighter stars at epoch 2016.0.

    Columns use Gaia names (ra, dec, ra_error, dec_error in mas, pmra, pmdec, parallax and
    their errors, ref_epoch) plus AB magnitudes and errors per band (``g_mag``, ``g_magErr``...).
    """
    bright = stars[stars["mag"] < spec.refcat_mag_max]
    n = len(bright)
    pos_err, pm_err, plx_err = gaia_like_errors(bright["mag"].to_numpy())
    cosd = np.cos(np.deg2rad(bright["dec"].to_numpy()))
    mag = bright["mag"].to_numpy()
    g_r = bright["g_r"].to_numpy()
    # Colours relative to the dataset's band, so that band's magnitude is exact up to errors.
    offsets = {"g": g_r, "r": 0.0 * g_r, "i": -0.4 * g_r, "z": -0.6 * g_r}
    own = offsets[spec.band] if spec.band in offsets else 0.0 * g_r
    mag_err = 0.001 + 0.01 * 10 ** (0.4 * (mag - 20.0))
    cat = pd.DataFrame({
        "source_id": bright["object_id"].to_numpy(),
        "ra": bright["ra"].to_numpy() + rng.normal(0, pos_err) / 3.6e6 / cosd,
        "dec": bright["dec"].to_numpy() + rng.normal(0, pos_err) / 3.6e6,
        "ra_error": pos_err, "dec_error": pos_err,
        "pmra": bright["pmra"].to_numpy() + rng.normal(0, pm_err),
        "pmra_error": pm_err,
        "pmdec": bright["pmdec"].to_numpy() + rng.normal(0, pm_err),
        "pmdec_error": pm_err,
        "parallax": bright["parallax"].to_numpy() + rng.normal(0, plx_err),
        "parallax_error": plx_err,
        "ref_epoch": np.full(n, 2016.0),
        "phot_variable_flag": np.where(bright["is_variable"], "VARIABLE", "NOT_AVAILABLE"),
    })
    for band, off in offsets.items():
        cat[f"{band}_mag"] = mag + off - own + (rng.normal(0, mag_err) if band == spec.band
                                                else 0.0)
        cat[f"{band}_magErr"] = mag_err
    return cat

