"""Host galaxies for hosted fakes: chosen from the field, offsets drawn from their light profile.

Hosts come from either

* a source catalog of the exposure (``apqa process`` ``sources.parquet``: ``x``, ``y``, ``ra``,
  ``dec``, ``ixx``, ``iyy``, ``ixy`` in pixels^2, ``apFlux`` or ``psfFlux`` in nJy,
  ``extendedness``): each galaxy becomes an exponential disk (Sersic n = 1) whose second moments
  are the measured ones minus the PSF's, mapped to the sky through the local WCS Jacobian; or
* a host table with Sersic parameters (``ra``, ``dec``, ``mag``, ``half_light_radius`` arcsec,
  ``q``, ``beta`` deg and ``sersic_n`` or ``n``; the simulator's ``truth/objects.parquet``
  galaxies have them).

Every host is described by the same columns (:data:`HOST_COLUMNS`), world offsets are
``(du, dv)`` in arcsec with +u west and +v north (GalSim's convention), and ``beta`` is the
major-axis angle from +u towards +v.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import gamma, gammaincinv

from apqa.datamodel import Exposure
from apqa.datamodel.photocalib import AB_MAG_OF_ONE_NJY, abmag_to_njy, njy_to_abmag
from apqa.errors import InputError
from apqa.sim.render import local_jacobians

HOST_COLUMNS = ("host_id", "ra", "dec", "mag", "n", "re", "q", "beta")
#: Per-axis second moment of an exponential disk is 3 h^2 (h = scale length).
_EXP_MOMENT = 3.0
_SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


def sersic_b(n: np.ndarray | float) -> np.ndarray:
    """b_n such that half of a Sersic profile's light lies within its half-light radius."""
    return gammaincinv(2.0 * np.asarray(n, np.float64), 0.5)


def _id_column(table: pd.DataFrame) -> np.ndarray:
    for name in ("object_id", "sourceId", "host_id", "id"):
        if name in table:
            return table[name].to_numpy(np.int64)
    return np.arange(len(table), dtype=np.int64)


def _from_sersic_table(table: pd.DataFrame) -> pd.DataFrame:
    n_col = "sersic_n" if "sersic_n" in table else "n"
    return pd.DataFrame({
        "host_id": _id_column(table),
        "ra": table["ra"].to_numpy(np.float64), "dec": table["dec"].to_numpy(np.float64),
        "mag": table["mag"].to_numpy(np.float64), "n": table[n_col].to_numpy(np.float64),
        "re": table["half_light_radius"].to_numpy(np.float64),
        "q": table["q"].to_numpy(np.float64), "beta": table["beta"].to_numpy(np.float64),
    })


def _from_source_catalog(table: pd.DataFrame, exposure: Exposure, source: str) -> pd.DataFrame:
    if exposure.wcs is None or exposure.psf is None:
        raise InputError(f"{source}: hosts from a source catalog need an exposure with a WCS "
                         "and a PSF (to remove the PSF from the measured moments)")
    flux_col = "apFlux" if "apFlux" in table else "psfFlux"
    x, y = table["x"].to_numpy(np.float64), table["y"].to_numpy(np.float64)
    sigma2 = (exposure.psf.fwhm / _SIGMA_TO_FWHM) ** 2
    moments = np.empty((len(table), 2, 2))
    moments[:, 0, 0] = table["ixx"].to_numpy(np.float64) - sigma2
    moments[:, 1, 1] = table["iyy"].to_numpy(np.float64) - sigma2
    moments[:, 0, 1] = moments[:, 1, 0] = table["ixy"].to_numpy(np.float64)
    jac = local_jacobians(exposure.wcs, x, y) if len(table) else np.zeros((0, 2, 2))
    world = jac @ moments @ np.transpose(jac, (0, 2, 1))  # arcsec^2, (u, v) axes
    world = np.where(np.isfinite(world), world, 0.0)
    evals, evecs = np.linalg.eigh(world)  # ascending eigenvalues
    minor, major = np.clip(evals[:, 0], 0, None), np.clip(evals[:, 1], 0, None)
    a, b = np.sqrt(major / _EXP_MOMENT), np.sqrt(minor / _EXP_MOMENT)
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = table[flux_col].to_numpy(np.float64)
        mag = np.where(flux > 0, njy_to_abmag(np.where(flux > 0, flux, 1.0)), np.nan)
        q = np.where(a > 0, b / a, np.nan)
    beta = np.rad2deg(np.arctan2(evecs[:, 1, 1], evecs[:, 0, 1])) % 180.0
    return pd.DataFrame({
        "host_id": _id_column(table), "ra": table["ra"].to_numpy(np.float64),
        "dec": table["dec"].to_numpy(np.float64), "mag": mag, "n": np.ones(len(table)),
        "re": float(sersic_b(1.0)) * np.sqrt(a * b), "q": q, "beta": beta,
    })


def select_hosts(table: pd.DataFrame, exposure: Exposure, mag_range: tuple[float, float],
                 min_extendedness: float = 0.5, margin: float = 0.0,
                 source: str = "hosts") -> pd.DataFrame:
    """Hosts (columns :data:`HOST_COLUMNS`) from a source catalog or a Sersic host table.

    Kept: galaxies (``extendedness >= min_extendedness`` when that column exists, ``kind ==
    'galaxy'`` when a ``kind`` column exists) with ``mag_range[0] <= mag <= mag_range[1]``,
    a measurable, valid profile (0.3 <= n <= 6.2, re > 0, 0 < q <= 1) and a centre inside the
    exposure at least ``margin`` pixels from its edges.
    """
    has_sersic = {"ra", "dec", "mag", "half_light_radius", "q", "beta"} <= set(table) and (
        "sersic_n" in table or "n" in table)
    has_moments = {"x", "y", "ra", "dec", "ixx", "iyy", "ixy"} <= set(table) and (
        "apFlux" in table or "psfFlux" in table)
    if not (has_sersic or has_moments):
        raise InputError(
            f"{source}: expected a source catalog (x, y, ra, dec, ixx, iyy, ixy, apFlux or "
            "psfFlux, extendedness) or a host table (ra, dec, mag, sersic_n or n, "
            f"half_light_radius, q, beta); got columns {sorted(table.columns)}")
    keep = np.ones(len(table), bool)
    if "kind" in table:
        keep &= table["kind"].astype(str).to_numpy() == "galaxy"
    if "extendedness" in table:
        keep &= table["extendedness"].to_numpy(np.float64) >= min_extendedness
    table = table[keep]
    hosts = (_from_sersic_table(table) if has_sersic
             else _from_source_catalog(table, exposure, source))
    ok = np.array((hosts["mag"] >= mag_range[0]) & (hosts["mag"] <= mag_range[1])
                  & hosts["n"].between(0.3, 6.2) & (hosts["re"] > 0) & (hosts["q"] > 0)
                  & (hosts["q"] <= 1) & np.isfinite(hosts["beta"]), dtype=bool)
    if exposure.wcs is not None and ok.any():
        x, y = exposure.sky_to_pixel(hosts["ra"].to_numpy(), hosts["dec"].to_numpy())
        ok &= ((x >= margin) & (x <= exposure.width - 1 - margin)
               & (y >= margin) & (y <= exposure.height - 1 - margin))
    return hosts[ok].reset_index(drop=True)


def sample_offsets(hosts: pd.DataFrame, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """World offsets (du, dv) in arcsec drawn from each host's elliptical Sersic profile.

    The enclosed light of a Sersic profile is the regularized incomplete gamma function
    P(2n, b_n (R/re)^(1/n)), so R = re (G / b_n)^n with G ~ Gamma(2n) is an exact draw; the
    circular offset is then sheared by q (area-preserving, as GalSim does) and rotated by beta.
    """
    n = hosts["n"].to_numpy(np.float64)
    radius = hosts["re"].to_numpy(np.float64) * (rng.gamma(2.0 * n) / sersic_b(n)) ** n
    phi = rng.uniform(0.0, 2.0 * np.pi, len(hosts))
    sq = np.sqrt(hosts["q"].to_numpy(np.float64))
    a_u, a_v = radius * np.cos(phi) / sq, radius * np.sin(phi) * sq
    beta = np.deg2rad(hosts["beta"].to_numpy(np.float64))
    return a_u * np.cos(beta) - a_v * np.sin(beta), a_u * np.sin(beta) + a_v * np.cos(beta)


def surface_brightness(hosts: pd.DataFrame, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Host surface brightness (AB mag/arcsec^2) at world offsets (du, dv) arcsec.

    ``I(R) = F b^(2n) exp(-b (R/re)^(1/n)) / (2 pi n re^2 Gamma(2n))`` at the elliptical radius
    R (area-preserving shear, so the normalization is the circular profile's).
    """
    n = hosts["n"].to_numpy(np.float64)
    re = hosts["re"].to_numpy(np.float64)
    sq = np.sqrt(hosts["q"].to_numpy(np.float64))
    beta = np.deg2rad(hosts["beta"].to_numpy(np.float64))
    a_u = du * np.cos(beta) + dv * np.sin(beta)
    a_v = -du * np.sin(beta) + dv * np.cos(beta)
    radius = np.hypot(a_u * sq, a_v / sq)
    b = sersic_b(n)
    flux = abmag_to_njy(hosts["mag"].to_numpy(np.float64))
    intensity = (flux * b ** (2 * n) * np.exp(-b * (radius / re) ** (1 / n))
                 / (2 * np.pi * n * re**2 * gamma(2 * n)))
    with np.errstate(divide="ignore"):
        return AB_MAG_OF_ONE_NJY - 2.5 * np.log10(intensity)
