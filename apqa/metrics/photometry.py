"""psFlux bias, flux pulls and centroid offsets of matched fakes, in true-S/N bins.

Bins are in true S/N (``truth_snr``) so that a bin does not select on the measurement. The
uncertainties of medians and robust standard deviations are their asymptotic Gaussian standard
errors (1.2533 and 1.1664 sigma / sqrt(n)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from apqa.metrics.registry import Measurement
from apqa.metrics.stats import bin_labels, median_and_scatter

SNR_EDGES = (5.0, 10.0, 20.0, 50.0, 100.0, np.inf)
"""True-S/N bins for photometry; the aggregate bin '10-inf' is added to them."""
AGGREGATE_MIN_SNR = 10.0
MIN_PER_BIN = 5
MAS_PER_DEG = 3.6e6


def _groups(snr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(snr_bin label, boolean selection) for every bin and the S/N >= 10 aggregate."""
    groups = [(label, (snr >= lo) & (snr < hi)) for label, lo, hi in
              zip(bin_labels(SNR_EDGES), SNR_EDGES[:-1], SNR_EDGES[1:], strict=True)]
    groups.append((f"{AGGREGATE_MIN_SNR:g}-inf", snr >= AGGREGATE_MIN_SNR))
    return groups


def _offsets_mas(found: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(dRA cos dec, dDec) of measured minus true positions in mas."""
    dra = (found["ra"].to_numpy(float) - found["truth_ra"].to_numpy(float) + 180) % 360 - 180
    cosd = np.cos(np.deg2rad(found["truth_dec"].to_numpy(float)))
    ddec = found["dec"].to_numpy(float) - found["truth_dec"].to_numpy(float)
    return dra * cosd * MAS_PER_DEG, ddec * MAS_PER_DEG


def photometry_metrics(matched: pd.DataFrame, tags: dict[str, str]) -> list[Measurement]:
    """psFlux bias and pull, centroid offsets (matched fakes) and the forced-flux pull (all).

    Parameters
    ----------
    matched
        The matched table of one band (contract columns ``truth_*``, ``forced_flux``,
        ``matched`` and the DiaSource ``psfFlux``, ``psfFluxErr``, ``ra``, ``dec``).
    tags
        Tags added to every measurement (each also gets ``snr_bin``).
    """
    out: list[Measurement] = []
    fakes = matched[matched["injection_flag"].to_numpy() == 0]
    forced_pull = ((fakes["forced_flux"].to_numpy(float) - fakes["truth_flux"].to_numpy(float))
                   / fakes["truth_flux_err"].to_numpy(float))
    _, _, sigma, sigma_err = median_and_scatter(forced_pull)
    if np.isfinite(sigma):
        out.append(Measurement("apqa.diffim.forcedFluxPullStd", sigma, None, sigma_err, tags))
    found = fakes[fakes["matched"].to_numpy(bool)]
    truth = found["truth_flux"].to_numpy(float)
    flux = found["psfFlux"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        bias = (flux - truth) / truth
        pull = (flux - truth) / found["psfFluxErr"].to_numpy(float)
    dra, ddec = _offsets_mas(found)
    offset = np.hypot(dra, ddec)
    for label, sel in _groups(found["truth_snr"].to_numpy(float)):
        if sel.sum() < MIN_PER_BIN:
            continue
        t = {**tags, "snr_bin": label}
        med, med_err, _, _ = median_and_scatter(bias[sel])
        out.append(Measurement("apqa.photometry.psfFluxBias", med, None, med_err, t))
        med, med_err, sigma, sigma_err = median_and_scatter(pull[sel])
        out.append(Measurement("apqa.photometry.psfFluxPullMedian", med, None, med_err, t))
        out.append(Measurement("apqa.photometry.psfFluxPullStd", sigma, None, sigma_err, t))
        med, med_err, _, _ = median_and_scatter(offset[sel])
        out.append(Measurement("apqa.photometry.centroidOffset", med, "mas", med_err, t))
        ra_med, ra_err, ra_sig, ra_sig_err = median_and_scatter(dra[sel])
        dec_med, dec_err, dec_sig, dec_sig_err = median_and_scatter(ddec[sel])
        out.append(Measurement("apqa.photometry.centroidBiasRa", ra_med, "mas", ra_err, t))
        out.append(Measurement("apqa.photometry.centroidBiasDec", dec_med, "mas", dec_err, t))
        # Per-axis scatter: the quadratic mean of the two axes' robust std.
        scatter = np.sqrt((ra_sig**2 + dec_sig**2) / 2)
        scatter_err = np.sqrt(ra_sig_err**2 + dec_sig_err**2) / 2
        out.append(Measurement("apqa.photometry.centroidScatter", scatter, "mas", scatter_err, t))
    return out
