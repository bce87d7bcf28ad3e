"""Completeness of injected fakes: binned fractions with Wilson intervals and logistic fits.

The fitted curve is ``c(x) = A / (1 + exp(-(x - x50) / w))`` against true S/N (increasing) and
``c(m) = A / (1 + exp((m - m50) / w))`` against magnitude (decreasing): ``x50`` is where the
curve reaches half its plateau ``A``. The fit maximizes the binomial likelihood of the detected
fractions in 100 equal-count bins (Fisher scoring with Levenberg damping, every bootstrap
replicate solved at once), and the uncertainties are the standard deviations over a
non-parametric bootstrap of the fakes (multinomial resampling of the bin-outcome cells, which is
exactly the pairs bootstrap of the binned data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apqa.metrics.registry import Measurement
from apqa.metrics.stats import bin_labels, fraction_measurement, wilson_interval

SNR_EDGES = (0.0, 3.0, 6.0, 8.0, 10.0, 20.0)
"""Rubin's fixed true-S/N bins for fake fractions."""
MAG_EDGES = (20.0, 22.0, 24.0, 26.0)
"""Rubin's fixed magnitude bins."""
HOST_SB_EDGES = (-np.inf, 20.0, 22.0, 24.0, np.inf)
HOST_SB_LABELS = ("<20", "20-22", "22-24", ">=24")
"""Host surface-brightness bins (mag/arcsec^2) for hosted fakes and their tag values."""
MIN_FAKES = 50
MIN_EACH_OUTCOME = 10


@dataclass(frozen=True)
class LogisticFit:
    """A fitted logistic completeness curve and its bootstrap standard deviations."""

    x50: float
    width: float
    plateau: float
    x50_err: float
    width_err: float
    plateau_err: float
    n: int

    def __call__(self, x: np.ndarray, decreasing: bool = False) -> np.ndarray:
        sign = -1.0 if decreasing else 1.0
        return self.plateau / (1 + np.exp(-sign * (np.asarray(x) - self.x50) / self.width))


def binned_completeness(x: np.ndarray, detected: np.ndarray, edges: tuple[float, ...],
                        z: float = 1.0) -> pd.DataFrame:
    """Detected fraction per bin with its Wilson interval.

    Returns
    -------
    pandas.DataFrame
        One row per bin: ``bin`` label, ``lo``, ``hi``, ``n``, ``k``, ``fraction``, ``lower``,
        ``upper`` (the interval at ``z`` sigma).
    """
    x = np.asarray(x, float)
    detected = np.asarray(detected, bool)
    idx = np.searchsorted(np.asarray(edges), x, side="right") - 1
    ok = (idx >= 0) & (idx < len(edges) - 1) & np.isfinite(x)
    nbin = len(edges) - 1
    n = np.bincount(idx[ok], minlength=nbin)
    k = np.bincount(idx[ok], weights=detected[ok], minlength=nbin).astype(int)
    lower, upper = wilson_interval(k, n, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = k / n
    return pd.DataFrame({"bin": bin_labels(edges), "lo": edges[:-1], "hi": edges[1:], "n": n,
                         "k": k, "fraction": fraction, "lower": lower, "upper": upper})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def _model(theta: np.ndarray, x: np.ndarray, sign: float):
    """p (B, nb) and its Jacobian (B, nb, 3) for parameters (x50, log w, logit A)."""
    x50, logw, a = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    z = sign * (x[None, :] - x50) * np.exp(-logw)
    s = _sigmoid(z)
    amp = _sigmoid(a)
    p = amp * s
    ds = amp * s * (1 - s)
    jac = np.stack([ds * (-sign * np.exp(-logw)), ds * (-z),
                    np.broadcast_to(s * amp * (1 - amp), p.shape)], axis=-1)
    return p, jac


def _nll(p: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(k * np.log(p) + (n - k) * np.log1p(-p)).sum(axis=1)


def _fit_batch(x: np.ndarray, n: np.ndarray, k: np.ndarray, theta0: np.ndarray, sign: float,
               min_log_width: float, iterations: int = 200) -> np.ndarray:
    """Maximum-likelihood fits of many binned data sets at once (damped Fisher scoring).

    The width is kept above ``exp(min_log_width)``: a bootstrap replicate whose detected and
    missed fakes happen to separate perfectly has its optimum at zero width, where the 50%
    point is undetermined and the fit would stop wherever the iterations ran out.
    """
    theta = np.repeat(theta0[None, :], n.shape[0], axis=0)
    theta[:, 1] = np.maximum(theta[:, 1], min_log_width)
    # Only the fits still moving are iterated (small, degenerate replicates take many steps).
    active = np.arange(n.shape[0])
    lam = np.full(n.shape[0], 1e-3)
    p, jac = _model(theta, x, sign)
    loss = _nll(p, n, k)
    for _ in range(iterations):
        th, pa, ja, na, ka = theta[active], p[active], jac[active], n[active], k[active]
        pc = np.clip(pa, 1e-9, 1 - 1e-9)
        w = na / (pc * (1 - pc))
        score = (ja * ((ka - na * pc) / (pc * (1 - pc)))[:, :, None]).sum(axis=1)
        # Projected scoring: a parameter held at its bound by a score pushing outwards is
        # frozen for this step, so the free ones still converge.
        frozen = np.zeros(th.shape, bool)
        frozen[:, 1] = (th[:, 1] <= min_log_width) & (score[:, 1] < 0)
        frozen[:, 2] = ((th[:, 2] >= 12) & (score[:, 2] > 0)) | (
            (th[:, 2] <= -12) & (score[:, 2] < 0))
        free_jac = np.where(frozen[:, None, :], 0.0, ja)
        info = np.matmul((free_jac * w[:, :, None]).transpose(0, 2, 1), free_jac)
        diag = np.diagonal(info, axis1=1, axis2=2)
        damped = info + (lam[active, None] * diag + 1e-9)[:, :, None] * np.eye(3)[None]
        step = np.linalg.solve(damped, np.where(frozen, 0.0, score)[:, :, None])[:, :, 0]
        trial = th + step
        trial[:, 1] = np.maximum(trial[:, 1], min_log_width)
        trial[:, 2] = np.clip(trial[:, 2], -12, 12)  # plateau kept inside (0, 1)
        moved = np.abs(trial - th).max(axis=1)
        tp, tj = _model(trial, x, sign)
        tl = _nll(tp, na, ka)
        better = np.isfinite(tl) & (tl <= loss[active])
        idx = active[better]
        theta[idx], p[idx], jac[idx], loss[idx] = (
            trial[better], tp[better], tj[better], tl[better])
        lam[active] = np.where(better, lam[active] / 3, lam[active] * 4)
        # Done: the last step moved nothing, or no step downhill is left (flat likelihood).
        active = active[~((moved < 1e-8) | (lam[active] > 1e6))]
        if active.size == 0:
            break
    return theta


def fit_logistic(x: np.ndarray, detected: np.ndarray, *, decreasing: bool = False,
                 n_boot: int = 200, seed: int = 0, n_bins: int = 100) -> LogisticFit | None:
    """Fit a logistic completeness curve with bootstrap uncertainties.

    Parameters
    ----------
    x
        True S/N or magnitude of each fake.
    detected
        Whether each fake was detected (matched).
    decreasing
        True for magnitudes (completeness falls with x).
    n_boot
        Bootstrap replicates.
    seed
        Seed of the bootstrap draws.

    Returns
    -------
    LogisticFit or None
        None when the data cannot constrain a curve (fewer than 50 fakes, fewer than 10
        detected or missed, or a 50% point outside the data's range).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> snr = rng.uniform(0, 15, 5000)
    >>> det = rng.random(5000) < 1 / (1 + np.exp(-(snr - 5) / 0.8))
    >>> fit = fit_logistic(snr, det, n_boot=50)
    >>> abs(fit.x50 - 5) < 4 * fit.x50_err
    True
    """
    x = np.asarray(x, float)
    detected = np.asarray(detected, bool)
    ok = np.isfinite(x)
    x, detected = x[ok], detected[ok]
    n_det = int(detected.sum())
    if len(x) < MIN_FAKES or min(n_det, len(x) - n_det) < MIN_EACH_OUTCOME:
        return None
    sign = -1.0 if decreasing else 1.0
    order = np.argsort(x, kind="stable")
    n_bins = min(n_bins, len(x))  # equal-count bins: never an empty one
    bins = np.minimum(np.arange(len(x)) * n_bins // len(x), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    xs = np.bincount(bins, weights=x[order], minlength=n_bins) / counts
    ks = np.bincount(bins, weights=detected[order], minlength=n_bins)
    frac = ks / counts
    amp0 = float(np.clip(frac.max(), 0.05, 0.99))
    # Start at the first bin (in the direction completeness rises) past half the plateau.
    rising = frac if sign > 0 else frac[::-1]
    xs_dir = xs if sign > 0 else xs[::-1]
    x50_0 = float(xs_dir[np.argmax(rising >= amp0 / 2)])
    width0 = max(float(np.std(x)) / 10, 1e-3)
    theta0 = np.array([x50_0, np.log(width0), np.log(amp0 / (1 - amp0))])
    # A width below half the spacing of the bin centres is not measurable from these data.
    min_log_width = float(np.log(max(0.5 * float(np.median(np.diff(xs))) if n_bins > 1
                                     else 0.0, 1e-6)))
    theta0[1] = max(theta0[1], min_log_width)
    best = _fit_batch(xs, counts[None].astype(float), ks[None], theta0, sign, min_log_width)[0]
    if not (xs[0] <= best[0] <= xs[-1]):
        return None
    rng = np.random.default_rng(seed)
    # Pairs bootstrap of the binned data: multinomial over (bin, outcome) cells.
    cells = np.concatenate([ks, counts - ks]) / len(x)
    draws = rng.multinomial(len(x), cells, size=n_boot).astype(float)
    kb = draws[:, :n_bins]
    nb = kb + draws[:, n_bins:]
    boot = _fit_batch(xs, nb, kb, best, sign, min_log_width)
    boot = boot[np.isfinite(boot).all(axis=1)]
    width, amp = np.exp(boot[:, 1]), _sigmoid(boot[:, 2])
    return LogisticFit(float(best[0]), float(np.exp(best[1])), float(_sigmoid(best[2])),
                       float(np.std(boot[:, 0], ddof=1)), float(np.std(width, ddof=1)),
                       float(np.std(amp, ddof=1)), len(x))


def _fit_measurements(sub: pd.DataFrame, detected: np.ndarray, tags: dict[str, str],
                      n_boot: int, seed: int) -> list[Measurement]:
    out = []
    snr_fit = fit_logistic(sub["truth_snr"].to_numpy(float), detected, n_boot=n_boot, seed=seed)
    if snr_fit is not None:
        out += [Measurement("apqa.completeness.snr50", snr_fit.x50, None, snr_fit.x50_err, tags),
                Measurement("apqa.completeness.snr50Width", snr_fit.width, None,
                            snr_fit.width_err, tags),
                Measurement("apqa.completeness.plateau", snr_fit.plateau, None,
                            snr_fit.plateau_err, tags)]
    mag_fit = fit_logistic(sub["truth_mag"].to_numpy(float), detected, decreasing=True,
                           n_boot=n_boot, seed=seed + 1)
    if mag_fit is not None:
        out += [Measurement("apqa.completeness.m50", mag_fit.x50, "mag", mag_fit.x50_err, tags),
                Measurement("apqa.completeness.m50Width", mag_fit.width, "mag",
                            mag_fit.width_err, tags)]
    return out


def _class_measurements(sub: pd.DataFrame, tags: dict[str, str], n_boot: int,
                        seed: int) -> list[Measurement]:
    detected = sub["matched"].to_numpy(bool)
    snr = sub["truth_snr"].to_numpy(float)
    out = [Measurement("apqa.completeness.nFakes", len(sub), None, None, tags)]
    in_bin = (snr >= 10) & (snr < 20)
    if in_bin.any():
        out.append(fraction_measurement("apqa.completeness.fraction_snr10",
                                        int(detected[in_bin].sum()), int(in_bin.sum()), tags))
    for edges, column, metric, key in (
            (SNR_EDGES, "truth_snr", "apqa.completeness.fractionInSnrBin", "snr_bin"),
            (MAG_EDGES, "truth_mag", "apqa.completeness.fractionInMagBin", "mag_bin")):
        table = binned_completeness(sub[column].to_numpy(float), detected, edges)
        for row in table[table["n"] > 0].itertuples():
            out.append(Measurement(metric, row.fraction, None, (row.upper - row.lower) / 2,
                                   {**tags, key: row.bin}))
    return out + _fit_measurements(sub, detected, tags, n_boot, seed)


def completeness_metrics(matched: pd.DataFrame, tags: dict[str, str], *, n_boot: int = 200,
                         seed: int = 0) -> list[Measurement]:
    """Completeness measurements of one band's matched table.

    Fakes whose injection was flagged are left out (and counted in
    ``apqa.injection.flaggedFraction``). Curves are computed for all fakes
    (``fake_class='all'``), for isolated, hosted and negative fakes, and for hosted fakes per
    host surface-brightness bin (tag ``host_sb``); a class too small to fit gives its binned
    fractions only.
    """
    flagged = matched["injection_flag"].to_numpy() != 0
    out = [fraction_measurement("apqa.injection.flaggedFraction", int(flagged.sum()),
                                len(matched), tags)] if len(matched) else []
    fakes = matched[~flagged]
    groups: list[tuple[dict[str, str], pd.DataFrame]] = [({"fake_class": "all"}, fakes)]
    for name in ("isolated", "hosted", "negative"):
        groups.append(({"fake_class": name}, fakes[fakes["fake_class"] == name]))
    hosted = fakes[fakes["fake_class"] == "hosted"]
    sb_bin = np.searchsorted(HOST_SB_EDGES, hosted["host_sb"].to_numpy(float), side="right") - 1
    for i, label in enumerate(HOST_SB_LABELS):
        groups.append(({"fake_class": "hosted", "host_sb": label}, hosted[sb_bin == i]))
    for i, (extra, sub) in enumerate(groups):
        if len(sub):
            out += _class_measurements(sub, {**tags, **extra}, n_boot, seed + 2 * i)
    return out
