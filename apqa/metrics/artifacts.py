"""False DIASources and real/bogus classification metrics.

A DIASource is *real* when its ``diaSourceId`` is in the caller's set of real ids (matched to an
injected fake or to simulator truth) and *false* otherwise. The classifier score is the
DiaSource ``reliability`` (higher = more likely real).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from scipy.stats import rankdata

from apqa.errors import InputError
from apqa.metrics.registry import Measurement
from apqa.metrics.stats import fraction_measurement

FNR_LEVELS = (0.01, 0.03, 0.10)
COMPLETENESS_LEVELS = (0.90, 0.95, 0.99)
MASK_FLAGS = ("pixelFlags_bad", "pixelFlags_saturated", "pixelFlags_cr",
              "pixelFlags_interpolated", "pixelFlags_suspect", "pixelFlags_edge",
              "pixelFlags_nodata", "pixelFlags_streak")


def _flag(table: pd.DataFrame, column: str) -> np.ndarray:
    return table[column].fillna(False).to_numpy(bool)


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.deg2rad(ra), np.deg2rad(dec)
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def near_positions(ra: np.ndarray, dec: np.ndarray, ref_ra: np.ndarray, ref_dec: np.ndarray,
                   radius_arcsec: float) -> np.ndarray:
    """Whether each (ra, dec) lies within ``radius_arcsec`` of any reference position."""
    if len(ref_ra) == 0 or len(ra) == 0:
        return np.zeros(len(ra), bool)
    chord = 2 * np.sin(np.deg2rad(radius_arcsec / 3600) / 2)
    tree = cKDTree(_unit_vectors(np.asarray(ref_ra, float), np.asarray(ref_dec, float)))
    dist, _ = tree.query(_unit_vectors(np.asarray(ra, float), np.asarray(dec, float)),
                         distance_upper_bound=chord)
    return np.isfinite(dist)


def roc_summary(real_scores: np.ndarray, false_scores: np.ndarray) -> dict[str, float]:
    """ROC numbers of a score separating reals (higher) from false detections.

    Returns
    -------
    dict
        ``auc`` and ``auc_err`` (Hanley & McNeil 1982), ``eer`` (where FPR = FNR, linearly
        interpolated between thresholds), ``fpr@<f>`` (the false-positive rate of the cut that
        loses a fraction f of reals) for f in :data:`FNR_LEVELS`, ``purity@<c>`` for c in
        :data:`COMPLETENESS_LEVELS` with its denominator ``kept@<c>``, ``n_real``, ``n_false``.

    Examples
    --------
    >>> roc_summary(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.75]))["auc"]
    0.8888888888888888
    """
    real = np.sort(np.asarray(real_scores, float))
    false = np.sort(np.asarray(false_scores, float))
    n_p, n_n = len(real), len(false)
    ranks = rankdata(np.concatenate([real, false]))
    auc = float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    auc_err = float(np.sqrt((auc * (1 - auc) + (n_p - 1) * (q1 - auc**2)
                             + (n_n - 1) * (q2 - auc**2)) / (n_p * n_n)))
    out: dict[str, float] = {"auc": auc, "auc_err": auc_err, "n_real": n_p, "n_false": n_n}
    # Thresholds: a source passes when score >= t.
    thresholds = np.unique(np.concatenate([real, false, [np.inf]]))
    fnr = np.searchsorted(real, thresholds, side="left") / n_p
    fpr = 1 - np.searchsorted(false, thresholds, side="left") / n_n
    diff = fnr - fpr  # rises from -FPR(min) to +1
    i = int(np.argmax(diff >= 0))
    if i == 0:
        out["eer"] = float((fnr[0] + fpr[0]) / 2)
    else:
        f = -diff[i - 1] / (diff[i] - diff[i - 1])
        out["eer"] = float(fnr[i - 1] + f * (fnr[i] - fnr[i - 1]))
    for level in FNR_LEVELS:
        t = real[min(int(np.floor(level * n_p)), n_p - 1)]
        out[f"fpr@{level:g}"] = float((false >= t).sum() / n_n)
    for level in COMPLETENESS_LEVELS:
        t = real[min(int(np.floor((1 - level) * n_p)), n_p - 1)]
        kept = int((real >= t).sum() + (false >= t).sum())
        out[f"purity@{level:g}"] = float((real >= t).sum() / kept)
        out[f"kept@{level:g}"] = kept
    return out


def artifact_metrics(dia_sources: pd.DataFrame, real_ids: np.ndarray, tags: dict[str, str], *,
                     area_deg2: float | None = None, n_exposures: int | None = None,
                     bright_stars: pd.DataFrame | None = None,
                     bright_radius_arcsec: float = 10.0) -> list[Measurement]:
    """False-DIASource rates and the real/bogus ROC numbers.

    Parameters
    ----------
    dia_sources
        DiaSource table (APDB columns).
    real_ids
        diaSourceIds that are real.
    tags
        Tags for every measurement.
    area_deg2
        Sky area searched (sum over processed visit-detectors), for the density.
    n_exposures
        Number of processed visit-detectors (default: those present in ``dia_sources``).
    bright_stars
        Optional table with ``ra``, ``dec`` (deg) of bright stars.
    bright_radius_arcsec
        Radius around a bright star that counts as "near".
    """
    if "diaSourceId" not in dia_sources:
        raise InputError("DiaSource table: column 'diaSourceId' is missing")
    real = np.isin(dia_sources["diaSourceId"].to_numpy(np.int64),
                   np.asarray(list(real_ids) if isinstance(real_ids, set) else real_ids,
                              dtype=np.int64))
    false = dia_sources[~real]
    n_false = len(false)
    out: list[Measurement] = []
    if area_deg2 is not None:
        if not area_deg2 > 0:
            raise InputError(f"area_deg2 must be positive, got {area_deg2}")
        out.append(Measurement("apqa.artifacts.falsePositiveDensity", n_false / area_deg2,
                               None, np.sqrt(n_false) / area_deg2, tags))
    if n_exposures is None:
        n_exposures = len(dia_sources[["visit", "detector"]].drop_duplicates())
    if n_exposures:
        out.append(Measurement("apqa.artifacts.falsePerDetector", n_false / n_exposures, None,
                               np.sqrt(n_false) / n_exposures, tags))
    if n_false:
        for metric, flags in (("apqa.artifacts.dipoleFraction", _flag(false, "isDipole")),
                              ("apqa.artifacts.negativeFraction", _flag(false, "isNegative"))):
            out.append(fraction_measurement(metric, int(flags.sum()), n_false, tags))
        masked = np.logical_or.reduce([_flag(false, c) for c in MASK_FLAGS])
        out.append(fraction_measurement("apqa.artifacts.maskedFraction", int(masked.sum()),
                                        n_false, tags))
        if bright_stars is not None:
            near = near_positions(false["ra"].to_numpy(float), false["dec"].to_numpy(float),
                                  bright_stars["ra"].to_numpy(float),
                                  bright_stars["dec"].to_numpy(float), bright_radius_arcsec)
            out.append(fraction_measurement("apqa.artifacts.nearBrightStarFraction",
                                            int(near.sum()), n_false, tags))
    out += _roc_measurements(dia_sources["reliability"].to_numpy(float), real, tags)
    return out


def _roc_measurements(score: np.ndarray, real: np.ndarray,
                      tags: dict[str, str]) -> list[Measurement]:
    scored = np.isfinite(score)
    real_scores, false_scores = score[scored & real], score[scored & ~real]
    if len(real_scores) == 0 or len(false_scores) == 0:
        return []
    roc = roc_summary(real_scores, false_scores)
    n_p, n_n = len(real_scores), len(false_scores)
    out = [Measurement("apqa.artifacts.rocAuc", roc["auc"], None, roc["auc_err"], tags)]
    eer_err = np.sqrt(roc["eer"] * (1 - roc["eer"]) * (1 / n_p + 1 / n_n) / 2)
    out.append(Measurement("apqa.artifacts.equalErrorRate", roc["eer"], None, eer_err, tags))
    for level in FNR_LEVELS:
        out.append(fraction_measurement("apqa.artifacts.fprAtFnr",
                                        round(roc[f"fpr@{level:g}"] * n_n), n_n,
                                        {**tags, "fnr": f"{level:g}"}))
    for level in COMPLETENESS_LEVELS:
        kept = roc[f"kept@{level:g}"]
        out.append(fraction_measurement("apqa.artifacts.purityAtCompleteness",
                                        round(roc[f"purity@{level:g}"] * kept), kept,
                                        {**tags, "completeness": f"{level:g}"}))
    return out
