"""DiaObject summaries recomputed from all of an object's DiaSources (vectorized over objects).

Columns filled (apdb.yaml names): ``ra``, ``dec``, ``raErr``, ``decErr`` (inverse-variance
weighted mean position, its standard error), ``nDiaSources``, ``firstDiaSourceMjdTai``,
``lastDiaSourceMjdTai`` and, per band ``{b}`` in ugrizy: ``{b}_psfFluxMean`` (inverse-variance
weighted), ``{b}_psfFluxMeanErr``, ``{b}_psfFluxSigma`` (standard deviation, ddof 1),
``{b}_psfFluxNdata``, ``{b}_psfFluxMin``, ``{b}_psfFluxMax``, ``{b}_psfFluxErrMean``,
``{b}_psfFluxMaxSlope`` (largest ``delta flux / delta time`` between consecutive epochs, nJy/d),
``{b}_scienceFluxMean`` and ``{b}_scienceFluxMeanErr``. The forced-photometry means
(``{b}_fpFluxMean``) and ``ra_dec_Cov`` are not computed here (the caller keeps the former and
nulls the latter).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BANDS = "ugrizy"


def _per_group(codes: np.ndarray, values: np.ndarray, n_groups: int, op: np.ufunc
               ) -> np.ndarray:
    """``op.reduceat`` over groups of sorted ``codes``; NaN for groups without rows."""
    out = np.full(n_groups, np.nan)
    if codes.size:
        present, starts = np.unique(codes, return_index=True)
        out[present] = op.reduceat(values, starts)
    return out


def _weighted(codes: np.ndarray, values: np.ndarray, errors: np.ndarray, n_groups: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean per group and its standard error (NaN if no weight)."""
    good = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    w = np.zeros(values.size)
    w[good] = 1.0 / errors[good] ** 2
    sw = np.bincount(codes, w, n_groups)
    swf = np.bincount(codes, np.where(good, w * values, 0.0), n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(sw > 0, swf / sw, np.nan)
        err = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
    return mean, err


def _band_columns(codes: np.ndarray, mjd: np.ndarray, flux: np.ndarray, err: np.ndarray,
                  sci: np.ndarray, sci_err: np.ndarray, n_groups: int, band: str
                  ) -> dict[str, np.ndarray]:
    ok = np.isfinite(flux)
    c, f, e, t = codes[ok], flux[ok], err[ok], mjd[ok]
    ndata = np.bincount(c, minlength=n_groups)
    mean, mean_err = _weighted(c, f, e, n_groups)
    plain = np.bincount(c, f, n_groups) / np.maximum(ndata, 1)
    dev2 = np.bincount(c, (f - plain[c]) ** 2, n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(ndata > 1, np.sqrt(dev2 / (ndata - 1)), np.nan)
        e_ok = np.isfinite(e)
        err_mean = (np.bincount(c[e_ok], e[e_ok], n_groups)
                    / np.bincount(c[e_ok], minlength=n_groups))
    # Rows are sorted by (object, time): consecutive rows of one object give the slopes.
    same = (c[1:] == c[:-1]) & (t[1:] > t[:-1])
    slope = (f[1:] - f[:-1])[same] / (t[1:] - t[:-1])[same]
    sci_mean, sci_err_mean = _weighted(codes, sci, sci_err, n_groups)
    return {
        f"{band}_psfFluxMean": mean,
        f"{band}_psfFluxMeanErr": mean_err,
        f"{band}_psfFluxSigma": sigma,
        f"{band}_psfFluxNdata": ndata,
        f"{band}_psfFluxMin": _per_group(c, f, n_groups, np.minimum),
        f"{band}_psfFluxMax": _per_group(c, f, n_groups, np.maximum),
        f"{band}_psfFluxErrMean": err_mean,
        f"{band}_psfFluxMaxSlope": _per_group(c[1:][same], slope, n_groups, np.maximum),
        f"{band}_scienceFluxMean": sci_mean,
        f"{band}_scienceFluxMeanErr": sci_err_mean,
    }


def summarize(sources: pd.DataFrame, sigma_floor_deg: float, sigma_fallback_deg: float
              ) -> pd.DataFrame:
    """One row per ``diaObjectId`` of ``sources`` with the summary columns (see module doc).

    Parameters
    ----------
    sources
        Every DiaSource of the objects to summarize (apdb.yaml DiaSource columns).
    sigma_floor_deg, sigma_fallback_deg
        Positional error floor, and the error used where ``raErr``/``decErr`` is missing (deg).

    Returns
    -------
    DataFrame
        Indexed by ``diaObjectId`` (int64), columns as in apdb.yaml's DiaObject.
    """
    order = np.lexsort((sources["midpointMjdTai"].to_numpy(np.float64),
                        sources["diaObjectId"].to_numpy(np.int64)))
    src = sources.iloc[order]
    ids, codes = np.unique(src["diaObjectId"].to_numpy(np.int64), return_inverse=True)
    k = ids.size
    mjd = src["midpointMjdTai"].to_numpy(np.float64)
    out: dict[str, np.ndarray] = {"nDiaSources": np.bincount(codes, minlength=k)}
    ra = np.radians(src["ra"].to_numpy(np.float64))
    dec = np.radians(src["dec"].to_numpy(np.float64))
    weights = []
    for col in ("raErr", "decErr"):
        sig = src[col].to_numpy(np.float64)
        sig = np.where(np.isfinite(sig), np.maximum(sig, sigma_floor_deg), sigma_fallback_deg)
        weights.append(1.0 / sig**2)
    w = 0.5 * (weights[0] + weights[1])
    xyz = [np.bincount(codes, w * v, k) for v in
           (np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec))]
    out["ra"] = np.degrees(np.arctan2(xyz[1], xyz[0])) % 360.0
    out["dec"] = np.degrees(np.arctan2(xyz[2], np.hypot(xyz[0], xyz[1])))
    out["raErr"] = 1.0 / np.sqrt(np.bincount(codes, weights[0], k))
    out["decErr"] = 1.0 / np.sqrt(np.bincount(codes, weights[1], k))
    out["firstDiaSourceMjdTai"] = _per_group(codes, mjd, k, np.minimum)
    out["lastDiaSourceMjdTai"] = _per_group(codes, mjd, k, np.maximum)
    band = src["band"].astype(object).to_numpy()
    columns = {c: src[c].to_numpy(np.float64, na_value=np.nan)
               for c in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr")}
    for b in BANDS:
        sel = band == b
        if not sel.any():
            out[f"{b}_psfFluxNdata"] = np.zeros(k, np.int64)
            continue
        out.update(_band_columns(codes[sel], mjd[sel], columns["psfFlux"][sel],
                                 columns["psfFluxErr"][sel], columns["scienceFlux"][sel],
                                 columns["scienceFluxErr"][sel], k, b))
    return pd.DataFrame(out, index=pd.Index(ids, name="diaObjectId"))
