"""Constructed inputs with known answers: matched tables and DiaSource tables.

Fluxes follow the AB system (31.4 mag = 1 nJy); the noise on the difference image is constant
so that true S/N = 5 at magnitude 24.5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

from apqa.datamodel.apdb_schema import empty_table

AB_NJY = 31.4
SIGMA_NJY = 10 ** (-0.4 * (24.5 - AB_NJY)) / 5
MAS = 1 / 3.6e6


def make_matched(n: int, *, seed: int, snr50: float = 5.0, width: float = 0.8,
                 plateau: float = 0.98, detect_vs: str = "snr", m50: float = 24.0,
                 m_width: float = 0.3, flux_bias: float = 0.0, pull_std: float = 1.0,
                 noise_ratio: float = 1.0, centroid_bias_mas: tuple[float, float] = (0.0, 0.0),
                 centroid_sigma_mas: float = 20.0, classes: tuple[str, ...] = (
                     "isolated", "hosted", "negative"), band: str = "g",
                 flagged_fraction: float = 0.0, mag_range: tuple[float, float] = (20.0, 26.5)
                 ) -> pd.DataFrame:
    """A matched table (contract columns) whose fakes follow a known completeness curve."""
    rng = np.random.default_rng(seed)
    fake_class = rng.choice(np.array(classes), n)
    mag = rng.uniform(*mag_range, n)
    sign = np.where(fake_class == "negative", -1.0, 1.0)
    flux = sign * 10 ** (-0.4 * (mag - AB_NJY))
    snr = np.abs(flux) / SIGMA_NJY
    if detect_vs == "snr":
        p = plateau * expit((snr - snr50) / width)
    else:
        p = plateau * expit(-(mag - m50) / m_width)
    matched = rng.random(n) < p
    ra0 = rng.uniform(150.0, 150.2, n)
    dec0 = rng.uniform(2.1, 2.3, n)
    dra = (centroid_bias_mas[0] + rng.normal(0, centroid_sigma_mas, n)) * MAS
    ddec = (centroid_bias_mas[1] + rng.normal(0, centroid_sigma_mas, n)) * MAS
    table = pd.DataFrame({
        "injection_id": np.arange(n, dtype=np.int64),
        "kind": "point",
        "fake_class": fake_class,
        "visit": np.full(n, 410001, np.int64),
        "detector": np.full(n, 1, np.int16),
        "band": band,
        "truth_ra": ra0, "truth_dec": dec0,
        "truth_x": rng.uniform(0, 2048, n), "truth_y": rng.uniform(0, 4096, n),
        "truth_mag": mag, "truth_flux": flux,
        "truth_flux_err": np.full(n, SIGMA_NJY),
        "forced_flux": flux + rng.normal(0, SIGMA_NJY * noise_ratio, n),
        "truth_snr": snr,
        "host_sb": np.where(fake_class == "hosted", rng.uniform(19, 25, n), np.nan),
        "injection_flag": (rng.random(n) < flagged_fraction).astype(np.int32),
        "matched": matched,
        "match_distance": np.where(matched, 0.1, np.nan),
    })
    dia = empty_table("DiaSource", n).drop(columns=["visit", "detector", "band"])
    dia["diaSourceId"] = 410001 * 10**8 + 100000 + np.arange(n)
    dia["ra"] = np.where(matched, ra0 + dra / np.cos(np.deg2rad(dec0)), np.nan)
    dia["dec"] = np.where(matched, dec0 + ddec, np.nan)
    psf_flux = flux * (1 + flux_bias) + rng.normal(0, SIGMA_NJY * pull_std, n)
    dia["psfFlux"] = np.where(matched, psf_flux, np.nan).astype(np.float32)
    dia["psfFluxErr"] = np.where(matched, SIGMA_NJY, np.nan).astype(np.float32)
    dia["snr"] = np.where(matched, np.abs(psf_flux) / SIGMA_NJY, np.nan).astype(np.float32)
    return pd.concat([table, dia], axis=1)


def make_dia_sources(n_real: int, n_false: int, *, seed: int, separation: float = 2.0,
                     dipole_fraction: float = 0.2, negative_fraction: float = 0.4,
                     masked_fraction: float = 0.1, n_visits: int = 4
                     ) -> tuple[pd.DataFrame, np.ndarray]:
    """A DiaSource table and its real ids; reliability is a logistic of Gaussian scores,
    N(separation, 1) for reals and N(0, 1) for false detections."""
    rng = np.random.default_rng(seed)
    n = n_real + n_false
    table = empty_table("DiaSource", n)
    table["diaSourceId"] = np.arange(n, dtype=np.int64) + 10**12
    table["visit"] = 410001 + rng.integers(0, n_visits, n)
    table["detector"] = np.int16(1)
    table["band"] = "g"
    table["ra"] = rng.uniform(150.0, 150.2, n)
    table["dec"] = rng.uniform(2.1, 2.3, n)
    score = np.concatenate([rng.normal(separation, 1, n_real), rng.normal(0, 1, n_false)])
    table["reliability"] = expit(score).astype(np.float32)
    real = np.zeros(n, bool)
    real[:n_real] = True
    false_idx = np.flatnonzero(~real)
    table["isDipole"] = pd.array(np.zeros(n, bool), dtype="boolean")
    table["isNegative"] = pd.array(np.zeros(n, bool), dtype="boolean")
    table["pixelFlags_cr"] = pd.array(np.zeros(n, bool), dtype="boolean")
    for column, fraction in (("isDipole", dipole_fraction), ("isNegative", negative_fraction),
                             ("pixelFlags_cr", masked_fraction)):
        chosen = rng.choice(false_idx, round(fraction * n_false), replace=False)
        table.loc[chosen, column] = True
    return table, table["diaSourceId"].to_numpy()[real]
