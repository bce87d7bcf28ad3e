"""Astrometric/photometric reference catalogues with Gaia DR3 column names.

A reference catalogue is a table (Parquet, CSV or FITS) with ``ra`` and ``dec`` (degrees, at
``ref_epoch``), optional ``ra_error``/``dec_error`` (mas), ``pmra`` (mu_alpha* = mu_alpha cos dec,
mas/yr), ``pmdec`` (mas/yr), ``parallax`` (mas), ``ref_epoch`` (Julian year) and photometry per
band as AB magnitudes ``{band}_mag`` (``{band}_magErr``) or fluxes ``{band}_flux``
(``{band}_fluxErr``, nJy). :func:`propagate_to_epoch` moves the positions to an observation epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.coordinates import get_body_barycentric
from astropy.table import Table
from astropy.time import Time

from apqa.datamodel.photocalib import AB_MAG_OF_ONE_NJY
from apqa.errors import InputError

MAS_PER_DEG = 3.6e6
DAYS_PER_JULIAN_YEAR = 365.25
MJD_J2016 = 57388.5  # Julian-year epoch 2016.0 (Gaia DR3)
DEFAULT_REF_EPOCH = 2016.0
#: Position error (mas) assumed when a catalogue gives none: a typical faint Gaia DR3 star.
DEFAULT_POSITION_ERROR_MAS = 1.0

# Gaia columns and the value that fills a missing column or a missing (NaN) entry.
_OPTIONAL_DEFAULTS = {
    "ra_error": DEFAULT_POSITION_ERROR_MAS,
    "dec_error": DEFAULT_POSITION_ERROR_MAS,
    "pmra": 0.0,
    "pmdec": 0.0,
    "parallax": 0.0,
    "ref_epoch": DEFAULT_REF_EPOCH,
}
_KNOWN = ("ra", "dec", *_OPTIONAL_DEFAULTS)
_PHOT_SUFFIXES = ("_mag", "_magErr", "_flux", "_fluxErr")
_READERS = {".parquet": "Parquet", ".pq": "Parquet", ".csv": "CSV", ".fits": "FITS",
            ".fit": "FITS", ".fts": "FITS"}


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":  # csv.gz and fits.gz read transparently
        suffixes = suffixes[:-1]
    fmt = _READERS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise InputError(f"{path}: unknown reference catalog format; expected a file ending in "
                         f"{', '.join(sorted(_READERS))} (optionally .gz for CSV/FITS)")
    return fmt


def _read_table(path: Path, fmt: str) -> pd.DataFrame:
    try:
        if fmt == "Parquet":
            return pd.read_parquet(path)
        if fmt == "CSV":
            return pd.read_csv(path, comment="#")
        table = Table.read(path, format="fits")
        # Vector columns cannot become pandas columns; a reference catalogue never needs them.
        scalar = [name for name in table.colnames if len(table[name].shape) <= 1]
        return table[scalar].to_pandas()
    except Exception as exc:  # any reader failure is the same user-facing problem
        raise InputError(f"{path}: cannot read as {fmt} reference catalog "
                         f"({exc.__class__.__name__}: {exc})") from None


def _as_float(df: pd.DataFrame, column: str, source: str) -> np.ndarray:
    """A column as float64, or an InputError naming the first non-numeric entry."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() & df[column].notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{source}: column '{column}': expected numbers, found "
                         f"{df[column].iloc[row]!r} in row {row}")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def load_refcat(path: str | Path) -> pd.DataFrame:
    """Read a reference catalogue with Gaia DR3 column names.

    Parameters
    ----------
    path
        A Parquet (``.parquet``, ``.pq``), CSV (``.csv``, ``.csv.gz``) or FITS table
        (``.fits``, ``.fit``, ``.fts``, ``.gz``) file. Gaia column names are matched without
        regard to case (``RA`` reads as ``ra``).

    Returns
    -------
    pandas.DataFrame
        One row per star (index 0..n-1) with float64 ``ra``, ``dec``, ``ra_error``,
        ``dec_error``, ``pmra``, ``pmdec``, ``parallax`` and ``ref_epoch``; missing errors are
        ``DEFAULT_POSITION_ERROR_MAS``, missing proper motions and parallaxes 0 and a missing
        epoch 2016.0. Photometry and any other columns are passed through.

    Raises
    ------
    InputError
        The file is missing or unreadable, ``ra``/``dec`` are missing, NaN or out of range, or
        a Gaia or photometry column is not numeric.

    Examples
    --------
    >>> import pandas as pd, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "ref.csv")
    >>> pd.DataFrame({"ra": [10.0], "dec": [-5.0], "g_mag": [18.0]}).to_csv(path, index=False)
    >>> cat = load_refcat(path)
    >>> float(cat["ref_epoch"].iloc[0]), float(cat["pmra"].iloc[0])
    (2016.0, 0.0)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: reference catalog not found")
    df = _read_table(path, _format_of(path))
    source = str(path)

    # Gaia archive FITS files often use upper-case names.
    lower = {name.lower(): name for name in df.columns}
    rename = {lower[k]: k for k in _KNOWN if k not in df.columns and k in lower}
    df = df.rename(columns=rename).reset_index(drop=True)

    for column in ("ra", "dec"):
        if column not in df.columns:
            raise InputError(f"{source}: column '{column}' not found; expected Gaia DR3 column "
                             f"names (ra, dec in degrees), found {list(df.columns)}")
        values = _as_float(df, column, source)
        if np.isnan(values).any():
            rows = np.flatnonzero(np.isnan(values))
            raise InputError(f"{source}: column '{column}': expected finite degrees, found "
                             f"{rows.size} NaN value(s), first in row {rows[0]}")
        df[column] = values
    if ((df["dec"] < -90) | (df["dec"] > 90)).any():
        raise InputError(f"{source}: column 'dec': expected degrees in [-90, 90], found "
                         f"{df['dec'].min()}..{df['dec'].max()}")

    for column, default in _OPTIONAL_DEFAULTS.items():
        values = (_as_float(df, column, source) if column in df.columns
                  else np.full(len(df), default))
        # Gaia two-parameter solutions have NaN proper motion and parallax: treat as zero.
        df[column] = np.where(np.isfinite(values), values, default)
    for column in df.columns:
        if isinstance(column, str) and column.endswith(_PHOT_SUFFIXES):
            df[column] = _as_float(df, column, source)
    df["ra"] = np.mod(df["ra"], 360.0)
    return df


def reference_flux(refcat: pd.DataFrame, band: str,
                   source: str = "reference catalog") -> tuple[np.ndarray, np.ndarray]:
    """Reference fluxes (nJy) and their errors in ``band``.

    Uses ``{band}_flux``/``{band}_fluxErr`` when present, otherwise converts the AB magnitudes
    ``{band}_mag``/``{band}_magErr``: flux = 10**(-0.4 (mag - 31.4)). Missing errors are NaN.

    Parameters
    ----------
    refcat
        A catalogue from :func:`load_refcat`.
    band
        Band name, e.g. ``"g"``.
    source
        Name of the catalogue (its file) for error messages.

    Raises
    ------
    InputError
        Neither ``{band}_flux`` nor ``{band}_mag`` is a column.

    Examples
    --------
    >>> import pandas as pd
    >>> flux, err = reference_flux(pd.DataFrame({"g_mag": [31.4], "g_magErr": [0.1]}), "g")
    >>> float(flux[0]), round(float(err[0]), 4)
    (1.0, 0.0921)
    """
    n = len(refcat)
    if f"{band}_flux" in refcat.columns:
        flux = refcat[f"{band}_flux"].to_numpy(dtype=np.float64)
        err_col = f"{band}_fluxErr"
        err = (refcat[err_col].to_numpy(dtype=np.float64) if err_col in refcat.columns
               else np.full(n, np.nan))
        return flux, err
    if f"{band}_mag" in refcat.columns:
        mag = refcat[f"{band}_mag"].to_numpy(dtype=np.float64)
        flux = 10.0 ** (-0.4 * (mag - AB_MAG_OF_ONE_NJY))
        err_col = f"{band}_magErr"
        mag_err = (refcat[err_col].to_numpy(dtype=np.float64) if err_col in refcat.columns
                   else np.full(n, np.nan))
        return flux, flux * mag_err * np.log(10.0) / 2.5
    raise InputError(f"{source}: band '{band}': expected column '{band}_flux' (nJy) or "
                     f"'{band}_mag' (AB mag); found {list(refcat.columns)}")


def propagate_to_epoch(refcat: pd.DataFrame, mjd_tai: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (degrees) seen from the geocentre at ``mjd_tai``, without aberration.

    Proper motion is applied linearly in time from each star's ``ref_epoch`` (Julian years;
    2016.0 is MJD 57388.5) and annual parallax from the Earth's barycentric position.

    Parameters
    ----------
    refcat
        A catalogue from :func:`load_refcat` (``ra``, ``dec``, ``pmra``, ``pmdec``,
        ``parallax``, ``ref_epoch``).
    mjd_tai
        Observation epoch, MJD in TAI.

    Returns
    -------
    ra, dec : numpy.ndarray
        Degrees.

    Examples
    --------
    >>> import pandas as pd
    >>> cat = pd.DataFrame({"ra": [0.0], "dec": [0.0], "pmra": [0.0], "pmdec": [1000.0],
    ...                     "parallax": [0.0], "ref_epoch": [2016.0]})
    >>> ra, dec = propagate_to_epoch(cat, 57388.5 + 365.25)
    >>> round(float(dec[0]) * 3600, 6)
    1.0
    """
    ra = refcat["ra"].to_numpy(dtype=np.float64)
    dec = refcat["dec"].to_numpy(dtype=np.float64)
    pmra = refcat["pmra"].to_numpy(dtype=np.float64)
    pmdec = refcat["pmdec"].to_numpy(dtype=np.float64)
    plx = refcat["parallax"].to_numpy(dtype=np.float64)
    ref_mjd = MJD_J2016 + (refcat["ref_epoch"].to_numpy(dtype=np.float64)
                           - DEFAULT_REF_EPOCH) * DAYS_PER_JULIAN_YEAR
    dt = (mjd_tai - ref_mjd) / DAYS_PER_JULIAN_YEAR
    x, y, z = get_body_barycentric(
        "earth", Time(mjd_tai, format="mjd", scale="tai")).xyz.to_value("AU")
    ra_r, dec_r = np.deg2rad(ra), np.deg2rad(dec)
    sin_ra, cos_ra, sin_dec, cos_dec = np.sin(ra_r), np.cos(ra_r), np.sin(dec_r), np.cos(dec_r)
    # Parallax displaces the star away from the observer's offset from the barycentre.
    d_ra_star = plx * (x * sin_ra - y * cos_ra)
    d_dec = plx * (x * cos_ra * sin_dec + y * sin_ra * sin_dec - z * cos_dec)
    ra_out = ra + (pmra * dt + d_ra_star) / MAS_PER_DEG / cos_dec
    dec_out = dec + (pmdec * dt + d_dec) / MAS_PER_DEG
    return np.mod(ra_out, 360.0), dec_out


def position_error_at_epoch(refcat: pd.DataFrame, mjd_tai: float) -> np.ndarray:
    """1-sigma position error (mas, per axis) of each star at ``mjd_tai``.

    The mean of the RA and Dec errors at ``ref_epoch`` plus the proper-motion errors times the
    time since then and the parallax error (a parallax factor of at most 1), in quadrature.
    Missing ``pmra_error``, ``pmdec_error`` or ``parallax_error`` columns (or NaN entries)
    count as zero.

    Examples
    --------
    >>> import pandas as pd
    >>> cat = pd.DataFrame({"ra_error": [0.3], "dec_error": [0.3], "pmra_error": [0.4],
    ...                     "pmdec_error": [0.4], "ref_epoch": [2016.0]})
    >>> round(float(position_error_at_epoch(cat, 57388.5 + 10 * 365.25)[0]), 3)
    4.011
    """
    def column(name: str, default: float) -> np.ndarray:
        if name not in refcat.columns:
            return np.full(len(refcat), default)
        values = refcat[name].to_numpy(dtype=np.float64)
        return np.where(np.isfinite(values), values, default)

    ref_mjd = MJD_J2016 + (column("ref_epoch", DEFAULT_REF_EPOCH)
                           - DEFAULT_REF_EPOCH) * DAYS_PER_JULIAN_YEAR
    dt = (mjd_tai - ref_mjd) / DAYS_PER_JULIAN_YEAR
    pos2 = (column("ra_error", DEFAULT_POSITION_ERROR_MAS) ** 2
            + column("dec_error", DEFAULT_POSITION_ERROR_MAS) ** 2) / 2
    pm2 = (column("pmra_error", 0.0) ** 2 + column("pmdec_error", 0.0) ** 2) / 2
    return np.sqrt(pos2 + pm2 * dt**2 + column("parallax_error", 0.0) ** 2)
