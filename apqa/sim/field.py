"""The survey plan (visits) and the static sky of a simulated dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from apqa.sim.camera import detector_wcs
from apqa.sim.catalogs import (
    MJD_J2016,
    SkyRegion,
    add_variability,
    gaia_like_errors,
    make_asteroids,
    make_galaxies,
    make_stars,
    make_transients,
)
from apqa.sim.datasets import DatasetSpec

#: Object id = KIND_BASE[kind] + running index, so ids are unique across kinds.
KIND_BASE = {"star": 100_000_000, "galaxy": 200_000_000, "transient": 300_000_000,
             "asteroid": 400_000_000}


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


def plan_visits(spec: DatasetSpec, n_visits: int, n_templates: int,
                rng: np.random.Generator) -> list[VisitPlan]:
    """Templates (deep, good seeing, a year earlier), then science visits night by night."""
    plans = []
    for j in range(n_templates):
        plans.append(_plan(spec, rng, spec.first_template_visit + j, True, -1 - j,
                           spec.template_mjd + j, spec.template_exptime, spec.template_seeing))
    for i in range(n_visits):
        night, k = divmod(i, spec.visits_per_night)
        mjd = spec.mjd_start + night * spec.night_spacing + k * 0.06
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


def make_sky(spec: DatasetSpec, plans: list[VisitPlan], region: SkyRegion,
             rng: np.random.Generator, asteroid_seed: np.random.SeedSequence) -> SkyField:
    """Draw the sky for a dataset: stars, galaxies, transients and per-night asteroids."""
    stars = make_stars(spec, region, rng)
    add_variability(stars, spec.variable_fraction, rng)
    stars.insert(0, "object_id", KIND_BASE["star"] + np.arange(len(stars)))
    galaxies = make_galaxies(spec, region, rng)
    galaxies.insert(0, "object_id", KIND_BASE["galaxy"] + np.arange(len(galaxies)))
    science = [p.mjd for p in plans if not p.is_template] or [spec.mjd_start]
    transients = make_transients(spec, region, galaxies, (min(science), max(science)), rng)
    transients.insert(0, "object_id", KIND_BASE["transient"] + np.arange(len(transients)))
    host_ids = galaxies["object_id"].to_numpy()
    idx = transients["host_index"].to_numpy()
    transients["host_id"] = np.where(idx >= 0, host_ids[np.clip(idx, 0, None)], -1) \
        if len(galaxies) else -1
    transients = transients.drop(columns="host_index")
    asteroids = {}
    nights = sorted({p.night for p in plans})
    for night, child in zip(nights, asteroid_seed.spawn(len(nights)), strict=True):
        night_mjd = float(np.mean([p.mjd for p in plans if p.night == night]))
        ast = make_asteroids(spec, region, night_mjd, np.random.default_rng(child))
        base = KIND_BASE["asteroid"] + (night + 100) * 100_000
        ast.insert(0, "object_id", base + np.arange(len(ast)))
        asteroids[night] = ast
    return SkyField(region, stars, galaxies, transients, asteroids)


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


__all__ = ["MJD_J2016", "KIND_BASE", "SkyField", "VisitPlan", "covered_region", "make_sky",
           "plan_visits", "reference_catalog"]
