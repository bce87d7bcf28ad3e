"""The simulated sky: stars (with proper motions and parallaxes), galaxies, variable stars,
transients (many on host galaxies) and moving asteroids.

All tables are pandas DataFrames; positions are ICRS degrees, magnitudes AB in the dataset's band.
Star positions are given at the Gaia DR3 reference epoch 2016.0 (``ref_epoch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apqa.sim.datasets import DatasetSpec

REF_EPOCH = 2016.0
MJD_J2016 = 57388.5  # 2016-01-01T12:00 TDB, the Julian-year epoch 2016.0

SERSIC_INDICES = np.array([0.5, 1.0, 1.5, 2.5, 4.0])
SERSIC_WEIGHTS = np.array([0.1, 0.45, 0.15, 0.15, 0.15])


@dataclass(frozen=True)
class SkyRegion:
    """An RA/Dec box (degrees)."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    @property
    def area_deg2(self) -> float:
        d_sin = np.sin(np.deg2rad(self.dec_max)) - np.sin(np.deg2rad(self.dec_min))
        return float((self.ra_max - self.ra_min) * np.rad2deg(d_sin))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` positions uniform on the sphere inside the box."""
        ra = rng.uniform(self.ra_min, self.ra_max, n)
        s0, s1 = np.sin(np.deg2rad([self.dec_min, self.dec_max]))
        dec = np.rad2deg(np.arcsin(rng.uniform(s0, s1, n)))
        return ra, dec


def power_law_mags(rng: np.random.Generator, n: int, m_min: float, m_max: float,
                   slope: float) -> np.ndarray:
    """Magnitudes with dN/dm proportional to 10^(slope m) between m_min and m_max."""
    a, b = 10 ** (slope * m_min), 10 ** (slope * m_max)
    return np.log10(a + (b - a) * rng.random(n)) / slope


def gaia_like_errors(mag: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position mas, proper motion mas/yr, parallax mas) 1-sigma errors versus G magnitude."""
    pos = 0.02 * 10 ** (0.28 * (np.maximum(mag, 13.0) - 15.0))
    return pos, pos * 1.1, pos * 1.3


def make_stars(spec: DatasetSpec, region: SkyRegion, rng: np.random.Generator) -> pd.DataFrame:
    """Stars at epoch 2016.0 with colours, proper motions and parallaxes."""
    n = rng.poisson(spec.star_density * region.area_deg2)
    ra, dec = region.sample(rng, n)
    mag = power_law_mags(rng, n, spec.star_mag_min, spec.star_mag_max, spec.star_slope)
    halo = rng.random(n) < 0.1
    pmra = np.where(halo, rng.normal(0, 25, n), rng.normal(-2.5, 5.0, n))
    pmdec = np.where(halo, rng.normal(0, 25, n), rng.normal(-3.0, 5.0, n))
    parallax = rng.exponential(0.5, n) + 0.02
    g_r = rng.normal(0.7, 0.3, n)
    return pd.DataFrame({
        "ra": ra, "dec": dec, "mag": mag, "pmra": pmra, "pmdec": pmdec, "parallax": parallax,
        "g_r": g_r,
    })


def make_galaxies(spec: DatasetSpec, region: SkyRegion, rng: np.random.Generator) -> pd.DataFrame:
    """Sersic galaxies: magnitude, index n, half-light radius (arcsec), axis ratio q, angle beta.

    ``beta`` (degrees) is the major axis angle from the +u (west) axis towards +v (north), the
    GalSim world-coordinate convention.
    """
    n = rng.poisson(spec.galaxy_density * region.area_deg2)
    ra, dec = region.sample(rng, n)
    mag = power_law_mags(rng, n, spec.galaxy_mag_min, spec.galaxy_mag_max, spec.galaxy_slope)
    hlr = spec.galaxy_hlr_at_20 * 10 ** (-0.1 * (mag - 20.0)) * rng.lognormal(0, 0.3, n)
    return pd.DataFrame({
        "ra": ra, "dec": dec, "mag": mag,
        "sersic_n": rng.choice(SERSIC_INDICES, n, p=SERSIC_WEIGHTS),
        "half_light_radius": np.clip(hlr, 0.1, 6.0),
        "q": rng.uniform(0.3, 1.0, n),
        "beta": rng.uniform(0, 180, n),
    })


def host_offsets(hosts: pd.DataFrame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (arcsec, +u west and +v north) drawn from each host's light profile.

    The radius follows an exponential disk (r/h ~ Gamma(2), h = hlr / 1.678), stretched by the
    host's axis ratio and rotated by its position angle, as GalSim shears the profile.
    """
    n = len(hosts)
    r = rng.gamma(2.0, 1.0, n) * hosts["half_light_radius"].to_numpy() / 1.678
    phi = rng.uniform(0, 2 * np.pi, n)
    q = hosts["q"].to_numpy()
    a_u, a_v = r * np.cos(phi) / np.sqrt(q), r * np.sin(phi) * np.sqrt(q)
    beta = np.deg2rad(hosts["beta"].to_numpy())
    return a_u * np.cos(beta) - a_v * np.sin(beta), a_u * np.sin(beta) + a_v * np.cos(beta)


def make_transients(spec: DatasetSpec, region: SkyRegion, galaxies: pd.DataFrame,
                    mjd_range: tuple[float, float], rng: np.random.Generator) -> pd.DataFrame:
    """Supernova-like transients; a ``hosted_fraction`` of them sit on bright galaxies."""
    n = rng.poisson(spec.transient_density * region.area_deg2)
    ra, dec = region.sample(rng, n)
    host_id = np.full(n, -1, dtype=np.int64)
    candidates = galaxies.index[galaxies["mag"] < 23.5].to_numpy()
    hosted = (rng.random(n) < spec.hosted_fraction) & (candidates.size > 0)
    if hosted.any():
        chosen = rng.choice(candidates, hosted.sum())
        hosts = galaxies.loc[chosen]
        du, dv = host_offsets(hosts, rng)
        cosd = np.cos(np.deg2rad(hosts["dec"].to_numpy()))
        ra[hosted] = hosts["ra"].to_numpy() - du / 3600.0 / cosd  # +u is west: RA decreases
        dec[hosted] = hosts["dec"].to_numpy() + dv / 3600.0
        host_id[hosted] = chosen
    return pd.DataFrame({
        "ra": ra, "dec": dec,
        "peak_mag": rng.uniform(spec.transient_mag_min, spec.transient_mag_max, n),
        "peak_mjd": rng.uniform(mjd_range[0] - 15, mjd_range[1] + 10, n),
        "rise_days": rng.uniform(3.0, 10.0, n),
        "decline_days": rng.uniform(10.0, 40.0, n),
        "host_index": host_id,
    })


def transient_flux_ratio(t: pd.DataFrame, mjd: float) -> np.ndarray:
    """Flux relative to peak at ``mjd``: Gaussian rise, exponential decline."""
    dt = mjd - t["peak_mjd"].to_numpy()
    rise = np.exp(-0.5 * (dt / t["rise_days"].to_numpy()) ** 2)
    decline = np.exp(-np.maximum(dt, 0) / t["decline_days"].to_numpy())
    ratio = np.where(dt < 0, rise, decline)
    return np.where(dt < -4 * t["rise_days"].to_numpy(), 0.0, ratio)


def variable_mag_offset(stars: pd.DataFrame, mjd: float) -> np.ndarray:
    """Magnitude offsets of variable stars at ``mjd`` (zero for constant stars)."""
    amp = stars["var_amplitude"].to_numpy()
    phase = 2 * np.pi * (mjd / stars["var_period"].to_numpy() + stars["var_phase"].to_numpy())
    return 0.5 * amp * np.sin(phase)


def add_variability(stars: pd.DataFrame, fraction: float, rng: np.random.Generator) -> None:
    """Mark a fraction of stars variable: sinusoidal light curves in magnitude (in place)."""
    n = len(stars)
    variable = rng.random(n) < fraction
    stars["is_variable"] = variable
    stars["var_amplitude"] = np.where(variable, rng.uniform(0.1, 0.8, n), 0.0)
    stars["var_period"] = np.where(variable, 10 ** rng.uniform(-1, 1.3, n), 1.0)
    stars["var_phase"] = rng.random(n)


def make_asteroids(spec: DatasetSpec, region: SkyRegion, night_mjd: float,
                   rng: np.random.Generator) -> pd.DataFrame:
    """Moving objects for one night: position at ``night_mjd``, rate (deg/day) and direction."""
    n = rng.poisson(spec.asteroid_density * region.area_deg2)
    ra, dec = region.sample(rng, n)
    fast = rng.random(n) < spec.fast_asteroid_fraction
    rate = np.where(fast, rng.uniform(1.0, 5.0, n), rng.uniform(0.1, 0.4, n))
    return pd.DataFrame({
        "ra": ra, "dec": dec, "ref_mjd": night_mjd, "rate": rate,
        "angle": rng.uniform(0, 360, n),  # direction of motion, degrees east of north
        "mag": rng.uniform(spec.asteroid_mag_min, spec.asteroid_mag_max, n),
    })


def asteroid_positions(ast: pd.DataFrame, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (degrees) at ``mjd`` for linear motion on the tangent plane."""
    dt = mjd - ast["ref_mjd"].to_numpy()
    angle = np.deg2rad(ast["angle"].to_numpy())
    dist = ast["rate"].to_numpy() * dt
    dec = ast["dec"].to_numpy() + dist * np.cos(angle)
    ra = ast["ra"].to_numpy() + dist * np.sin(angle) / np.cos(np.deg2rad(ast["dec"].to_numpy()))
    return ra, dec
