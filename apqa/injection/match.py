"""One-to-one, sign-aware matching of injected fakes to DIASources, with forced photometry of the
truth and an estimate of chance matches.

Candidates are the (fake, DIASource) pairs within ``radius_fwhm`` PSF FWHMs of each other on the
difference image whose signs agree (a negative fake, science minus template < 0, matches only
``isNegative`` DIASources; a positive one only positive DIASources). Each pair costs
``(d / R)^2 + flux_weight * min(chi^2, chi_max^2) / chi_max^2`` with ``chi`` the flux pull of
the DIASource's psfFlux against the truth flux. The assignment is solved globally
(``scipy.sparse.csgraph.min_weight_full_bipartite_matching``) with a private "no match" column
per fake whose cost exceeds any set of matches, so the matching is of maximum size first and of
least cost among those: close pairs are resolved by position and flux together, and no
DIASource serves two fakes (Rubin's fake matching is nearest-neighbour within 0.5" and not
one-to-one).

The chance-match fraction repeats the matching with the fakes' positions shifted by
``chance_shift`` match radii in four directions, against the DIASources not matched to fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.datamodel.photocalib import abmag_to_njy, njy_to_abmag
from apqa.errors import InputError
from apqa.injection.draw import catalog_positions
from apqa.pipeline.photometry import psf_flux

#: DiaSource columns that repeat a truth column: kept once, from the truth side.
_SHARED = ("visit", "detector", "band")
_NO_MATCH_COST = 1e4
_FORCED_BAD_PLANES = ("NO_DATA", "BAD", "SAT")


class MatchConfig(ConfigModel):
    """Matching settings."""

    radius_fwhm: float = Field(1.0, gt=0, description="match radius in PSF FWHMs")
    flux_weight: float = Field(0.5, ge=0, description="weight of the flux term in the cost")
    chi_max: float = Field(5.0, gt=0, description="flux pulls are capped here")
    chance_shift: float = Field(10.0, gt=2, description="shift for chance matches, radii")


@dataclass
class MatchResult:
    """The matched table (one row per fake) and the chance-match estimate."""

    table: pd.DataFrame
    chance_fraction: float
    radius_px: float
    chance_counts: list[tuple[int, int]] = field(default_factory=list)  # (matched, tried)


def truth_difference_flux(catalog: pd.DataFrame) -> np.ndarray:
    """nJy each fake adds to the difference image (science minus template).

    target science: ``+f(mag)``; template: ``-f(mag)``; both: ``f(mag) - f(template_mag)``
    (0 without a template magnitude).
    """
    targets = (catalog["target"].astype(str).to_numpy() if "target" in catalog
               else np.full(len(catalog), "science"))
    flux = np.asarray(abmag_to_njy(catalog["mag"].to_numpy(np.float64)))
    tmag = (catalog["template_mag"].to_numpy(np.float64) if "template_mag" in catalog
            else np.full(len(catalog), np.nan))
    template = np.where(np.isfinite(tmag), np.asarray(abmag_to_njy(tmag)), flux)
    return np.select([targets == "template", targets == "both"], [-flux, flux - template],
                     flux)


def merge_injected(*catalogs: pd.DataFrame) -> pd.DataFrame:
    """One row per fake (sorted by ``injection_id``) from the catalogs ``inject`` returned for
    science and template, with their ``injection_flag`` bits OR-ed together."""
    both = pd.concat(catalogs, ignore_index=True)
    flags = both.groupby("injection_id")["injection_flag"].agg(np.bitwise_or.reduce)
    merged = both.drop_duplicates("injection_id").set_index("injection_id").sort_index()
    merged["injection_flag"] = flags.astype(np.int32)
    return merged.reset_index()


def _assign(tx: np.ndarray, ty: np.ndarray, tflux: np.ndarray, terr: np.ndarray,
            sx: np.ndarray, sy: np.ndarray, sflux: np.ndarray, serr: np.ndarray,
            s_negative: np.ndarray, radius: float, config: MatchConfig) -> np.ndarray:
    """Index of the matched source for each truth row (-1 if none)."""
    n = tx.size
    out = np.full(n, -1, np.int64)
    usable = np.isfinite(tx) & np.isfinite(ty)
    placed = np.flatnonzero(np.isfinite(sx) & np.isfinite(sy))
    if not usable.any() or placed.size == 0:
        return out
    tree = cKDTree(np.column_stack([sx[placed], sy[placed]]))
    rows_idx = np.flatnonzero(usable)
    lists = tree.query_ball_point(np.column_stack([tx[rows_idx], ty[rows_idx]]), radius)
    counts = np.fromiter((len(c) for c in lists), np.int64, len(lists))
    rows = np.repeat(rows_idx, counts)
    cols = placed[np.concatenate(lists).astype(np.int64)] if counts.sum() else \
        np.zeros(0, np.int64)
    # Sign awareness: truth < 0 only with negative sources, truth > 0 only with positive ones.
    sign_ok = np.where(tflux[rows] < 0, s_negative[cols],
                       np.where(tflux[rows] > 0, ~s_negative[cols], True))
    rows, cols = rows[sign_ok], cols[sign_ok]
    if rows.size == 0:
        return out
    dist2 = ((tx[rows] - sx[cols]) ** 2 + (ty[rows] - sy[cols]) ** 2) / radius**2
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = (sflux[cols] - tflux[rows]) / np.sqrt(serr[cols] ** 2 + terr[rows] ** 2)
    chi2 = np.where(np.isfinite(chi), np.minimum(chi**2, config.chi_max**2), config.chi_max**2)
    cost = 1.0 + dist2 + config.flux_weight * chi2 / config.chi_max**2  # > 0: sparse needs it
    fakes = np.unique(rows)
    row_of = np.full(n, -1, np.int64)
    row_of[fakes] = np.arange(fakes.size)
    m = sx.size
    graph = csr_matrix((np.concatenate([cost, np.full(fakes.size, _NO_MATCH_COST)]),
                        (np.concatenate([row_of[rows], np.arange(fakes.size)]),
                         np.concatenate([cols, m + np.arange(fakes.size)]))),
                       shape=(fakes.size, m + fakes.size))
    r_ind, c_ind = min_weight_full_bipartite_matching(graph)
    hit = c_ind < m
    out[fakes[r_ind[hit]]] = c_ind[hit]
    return out


def _source_columns(dia: pd.DataFrame) -> tuple[np.ndarray, ...]:
    missing = [c for c in ("diaSourceId", "x", "y", "ra", "dec", "psfFlux") if c not in dia]
    if missing:
        raise InputError(f"DiaSource table: missing columns {missing}")
    sflux = dia["psfFlux"].to_numpy(np.float64, na_value=np.nan)
    serr = (dia["psfFluxErr"].to_numpy(np.float64, na_value=np.nan) if "psfFluxErr" in dia
            else np.full(len(dia), np.nan))
    negative = sflux < 0
    if "isNegative" in dia:
        flag = dia["isNegative"].astype("boolean")
        negative = np.where(flag.isna().to_numpy(), negative, flag.fillna(False).to_numpy(bool))
    return (dia["x"].to_numpy(np.float64, na_value=np.nan),
            dia["y"].to_numpy(np.float64, na_value=np.nan), sflux, serr, negative.astype(bool))


def _nullable(frame: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """Give integer and boolean columns that gained missing values pandas' nullable dtypes."""
    for col in frame.columns:
        dtype = original[col].dtype
        if pd.api.types.is_bool_dtype(dtype):
            frame[col] = frame[col].astype("boolean")
        elif pd.api.types.is_integer_dtype(dtype):
            frame[col] = frame[col].astype(pd.Int64Dtype() if dtype.itemsize == 8
                                           else f"Int{dtype.itemsize * 8}")
    return frame


def match_fakes(catalog: pd.DataFrame, diasources: pd.DataFrame, difference: Exposure,
                config: MatchConfig | None = None, *, visit: int | None = None,
                detector: int | None = None, band: str | None = None) -> MatchResult:
    """Match injected fakes to the DIASources of ``difference`` (see the module notes).

    Parameters
    ----------
    catalog
        The injection catalog (all fakes; ``injection_flag`` from :func:`merge_injected` or
        ``inject``; flagged fakes were not drawn and are never matched).
    diasources
        DiaSource table of the difference image (APDB columns).
    difference
        The difference image, with PSF, photometric calibration and (for ra/dec) WCS.

    Returns
    -------
    MatchResult
        ``table`` has the columns of the matched-table contract; ``chance_fraction`` is the
        fraction of shifted fakes that found a (non-fake) DIASource.
    """
    config = config or MatchConfig()
    if difference.psf is None or difference.photo_calib is None:
        raise InputError("difference image: matching needs its PSF and photometric calibration")
    cat = catalog.reset_index(drop=True)
    n = len(cat)
    tx, ty = catalog_positions(difference, cat)
    if {"ra", "dec"} <= set(cat):
        truth_ra, truth_dec = cat["ra"].to_numpy(np.float64), cat["dec"].to_numpy(np.float64)
    elif difference.wcs is not None:
        truth_ra, truth_dec = difference.pixel_to_sky(tx, ty)
    else:
        truth_ra = truth_dec = np.full(n, np.nan)
    flags = (cat["injection_flag"].to_numpy(np.int32) if "injection_flag" in cat
             else np.zeros(n, np.int32))
    tflux = truth_difference_flux(cat)
    forced, forced_err = forced_photometry(difference, tx, ty)

    radius = config.radius_fwhm * float(difference.psf.fwhm)
    sources = _source_columns(diasources)
    eligible = flags == 0
    mx, my = np.where(eligible, tx, np.nan), np.where(eligible, ty, np.nan)
    index = _assign(mx, my, tflux, forced_err, *sources, radius, config)

    # Chance matches: the fakes shifted by chance_shift radii, against the other DIASources.
    free = np.ones(len(diasources), bool)
    free[index[index >= 0]] = False
    shift = config.chance_shift * radius
    chance_counts = []
    for dx, dy in ((shift, 0.0), (-shift, 0.0), (0.0, shift), (0.0, -shift)):
        qx, qy = mx + dx, my + dy
        ok = ((qx >= 0) & (qx <= difference.width - 1) & (qy >= 0)
              & (qy <= difference.height - 1))
        hits = _assign(np.where(ok, qx, np.nan), np.where(ok, qy, np.nan), tflux, forced_err,
                       *(column[free] for column in sources), radius, config)
        chance_counts.append((int((hits >= 0).sum()), int(ok.sum())))
    tried = sum(t for _, t in chance_counts)
    chance = sum(h for h, _ in chance_counts) / tried if tried else float("nan")

    vi = difference.visit_info
    ident = (visit if visit is not None else (vi.visit if vi else 0),
             detector if detector is not None else (vi.detector if vi else 0),
             band if band is not None else (vi.band if vi else ""))
    table = _table(cat, (truth_ra, truth_dec, tx, ty), tflux, forced, forced_err,
                   flags, index, diasources, ident)
    return MatchResult(table, float(chance), radius, chance_counts)


def forced_photometry(difference: Exposure, x: np.ndarray, y: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Forced PSF flux and error (nJy) at (x, y) on the difference image (NaN off the image).

    NO_DATA, BAD and SAT pixels and pixels without a positive finite variance are left out.
    """
    calib = difference.photo_calib.calibration_mean
    inside = (np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (y >= -0.5)
              & (x < difference.width - 0.5) & (y < difference.height - 0.5))
    usable = (~difference.mask.is_set(list(_FORCED_BAD_PLANES))
              & np.isfinite(difference.variance) & (difference.variance > 0))
    flux = np.full(x.size, np.nan)
    err = np.full(x.size, np.nan)
    if inside.any():
        f, e, _, _ = psf_flux(difference.image, difference.variance, usable, difference.psf,
                              x[inside], y[inside])
        flux[inside], err[inside] = f * calib, e * calib
    return flux, err


def _table(cat: pd.DataFrame, positions: tuple[np.ndarray, ...],
           tflux: np.ndarray, forced: np.ndarray, forced_err: np.ndarray, flags: np.ndarray,
           index: np.ndarray, diasources: pd.DataFrame, ident: tuple[int, int, str]
           ) -> pd.DataFrame:
    """The matched table: truth columns, then the matched DiaSource's columns (or nulls)."""
    truth_ra, truth_dec, tx, ty = positions
    visit, detector, band = ident
    n = len(cat)
    matched = index >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        truth_mag = np.where(tflux != 0, njy_to_abmag(np.abs(np.where(tflux != 0, tflux, 1.0))),
                             np.nan)
        truth_snr = np.abs(tflux) / forced_err
    sources = diasources.reset_index(drop=True)
    distance = np.full(n, np.nan)
    if matched.any():
        ra = sources["ra"].to_numpy(np.float64, na_value=np.nan)[index[matched]]
        dec = sources["dec"].to_numpy(np.float64, na_value=np.nan)[index[matched]]
        dra = ((ra - truth_ra[matched] + 180.0) % 360.0 - 180.0) * np.cos(
            np.deg2rad(truth_dec[matched]))
        distance[matched] = np.hypot(dra, dec - truth_dec[matched]) * 3600.0
    truth = pd.DataFrame({
        "injection_id": cat["injection_id"].to_numpy(np.int64),
        "kind": cat["kind"].astype(str).to_numpy(),
        "fake_class": (cat["fake_class"].astype(str).to_numpy() if "fake_class" in cat
                       else np.where(cat["kind"] == "point", "isolated", cat["kind"])),
        "visit": np.full(n, visit, np.int64), "detector": np.full(n, detector, np.int16),
        "band": np.full(n, band, object),
        "truth_ra": truth_ra, "truth_dec": truth_dec, "truth_x": tx, "truth_y": ty,
        "truth_mag": truth_mag, "truth_flux": tflux, "truth_flux_err": forced_err,
        "forced_flux": forced, "truth_snr": truth_snr,
        "host_sb": (cat["host_sb"].to_numpy(np.float64) if "host_sb" in cat
                    else np.full(n, np.nan)),
        "injection_flag": flags.astype(np.int32), "matched": matched,
        "match_distance": distance,
    })
    columns = [c for c in sources.columns if c not in _SHARED]
    joined = sources[columns].reindex(np.where(matched, index, -1)).reset_index(drop=True)
    joined = _nullable(joined, sources[columns])
    return pd.concat([truth, joined], axis=1)
