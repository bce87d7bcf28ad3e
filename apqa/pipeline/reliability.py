"""Reliability (real/bogus) score of DIASources from their measured features.

A transparent, hand-set logistic model, not a trained classifier: each feature that marks the
usual artifacts (a PSF fit that does not fit, a dipole, a shape sharper than the PSF as cosmic
rays have, flagged pixels at the centre, a small residual on a bright template star) lowers the
score. It gives the metrics layer a ranking to compute ROC curves from; a trained model can
replace it behind the same function and a new ``RELIABILITY_VERSION``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: At most 7 characters: the APDB's ``reliabilityVersion`` column holds no more.
RELIABILITY_VERSION = "aplog-1"


def reliability_score(table: pd.DataFrame) -> np.ndarray:
    """Probability-like score in [0, 1] that each DIASource is astrophysical.

    Uses psfChi2/psfNdata, isDipole, the moment trace against the PSF's, the central pixel
    flags, S/N and the ratio of the change to the template flux.
    """
    if len(table) == 0:
        return np.zeros(0)

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy(np.float64, na_value=np.nan)

    dof = np.maximum(col("psfNdata") - 1, 1)
    chi2_dof = np.nan_to_num(col("psfChi2") / dof, nan=10.0)
    trace = (col("ixx") + col("iyy")) / (col("ixxPSF") + col("iyyPSF"))
    trace = np.nan_to_num(trace, nan=1.0)
    snr = np.nan_to_num(col("snr"), nan=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(col("psfFlux")) / np.abs(col("templateFlux"))
    change = np.nan_to_num(change, nan=np.inf, posinf=np.inf)
    flags = np.zeros(len(table), bool)
    for name in ("pixelFlags_crCenter", "pixelFlags_saturatedCenter", "pixelFlags_nodataCenter",
                 "pixelFlags_suspectCenter", "pixelFlags_streakCenter"):
        flags |= table[name].to_numpy(bool, na_value=False)

    logit = 3.0
    logit -= 1.5 * np.clip(chi2_dof - 1.5, 0, 6)  # the PSF does not describe it
    logit -= 4.0 * table["isDipole"].to_numpy(bool, na_value=False)
    logit -= 6.0 * np.clip(0.7 - trace, 0, None) / 0.2  # sharper than the PSF: cosmic ray
    logit -= 3.0 * flags
    logit -= 2.0 * (change < 0.05)  # a few per cent of a bright template source
    logit -= 1.5 * np.clip(7.0 - snr, 0, 2)  # near threshold, noise peaks are common
    return 1.0 / (1.0 + np.exp(-logit))
