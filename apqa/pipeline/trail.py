"""Trail fit: a line segment convolved with the PSF, for elongated DIASources (fast asteroids),
and the DiaSource trail columns (``measure_trails``).

The model of a source moving at constant rate during the exposure is a uniform segment of
length L at angle theta, convolved with the PSF. The segment is drawn on a 4x super-sampled
grid, binned and convolved with the PSF image by FFT; centre, length and angle are fit by
nonlinear least squares with the flux solved linearly at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.fft import irfft2, next_fast_len, rfft2
from scipy.optimize import least_squares

from apqa.datamodel import Exposure, Psf
from apqa.pipeline.photometry import fit_window
from apqa.pipeline.sky_geometry import position_angle

_OVERSAMPLE = 4


@dataclass
class TrailFit:
    """Result of one trail fit, in pixels, radians (from +x towards +y) and counts."""

    x: float
    y: float
    length: float
    angle: float
    flux: float
    flux_err: float
    chi2: float
    ndata: int


def _segment_image(shape: tuple[int, int], x: float, y: float, length: float, angle: float
                   ) -> np.ndarray:
    """A unit-flux segment centred on (x, y) (stamp pixels), area-sampled on the grid."""
    n = max(int(np.ceil(length * _OVERSAMPLE * 2)), 1) + 1
    t = np.linspace(-0.5, 0.5, n) * length
    px = x + t * np.cos(angle)
    py = y + t * np.sin(angle)
    # Bilinear splatting of many points along the segment: each carries 1/n of the flux.
    jx, jy = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - jx, py - jy
    index, weight = [], []
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xx, yy = jx + dx, jy + dy
        inside = (xx >= 0) & (xx < shape[1]) & (yy >= 0) & (yy < shape[0])
        index.append(yy[inside] * shape[1] + xx[inside])
        weight.append(w[inside] / n)
    # bincount sums repeated indices like np.add.at, many times faster.
    flat = np.bincount(np.concatenate(index), weights=np.concatenate(weight),
                       minlength=shape[0] * shape[1])
    return flat.reshape(shape)


def fit_trail(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, psf: Psf,
              x: float, y: float, length: float, angle: float) -> TrailFit | None:
    """Fit a trailed point source starting from centre (x, y), ``length`` (px), ``angle`` (rad).

    Returns None when the stamp has too few usable pixels or the fit fails.
    """
    kernel = psf.image_at(x, y)
    k = kernel.shape[0] // 2
    half = k + int(np.ceil(0.75 * length)) + 2
    data, sw, ok, x0, y0 = fit_window(image, variance, usable, x, y, half)
    if ok.sum() < 30:
        return None
    # Pad to avoid wrap-around, then convolve with the (centred) PSF by FFT.
    shape = (next_fast_len(data.shape[0] + 2 * k, real=True),
             next_fast_len(data.shape[1] + 2 * k, real=True))
    kpad = np.zeros(shape)
    kpad[:kernel.shape[0], :kernel.shape[1]] = kernel / kernel.sum()
    kpad = np.roll(kpad, (-k, -k), axis=(0, 1))
    kft = rfft2(kpad)

    def unit_model(params: np.ndarray) -> np.ndarray:
        seg = _segment_image(shape, params[0] - x0 + k, params[1] - y0 + k, abs(params[2]),
                             params[3])
        conv = irfft2(rfft2(seg) * kft, s=shape)
        return conv[k:k + data.shape[0], k:k + data.shape[1]]

    def solve(params: np.ndarray) -> tuple[float, float, np.ndarray]:
        m = unit_model(params)
        mw = m * sw
        norm = float((mw * mw).sum())
        if norm <= 0:
            return 0.0, np.inf, m
        flux = float((mw * data * sw).sum() / norm)
        return flux, 1.0 / np.sqrt(norm), m

    def residuals(params: np.ndarray) -> np.ndarray:
        flux, _, m = solve(params)
        return ((data - flux * m) * sw)[ok]

    start = np.array([x, y, max(length, 1.0), angle])
    lower = [x - 3, y - 3, 0.0, angle - np.pi / 2]
    upper = [x + 3, y + 3, 2.0 * half, angle + np.pi / 2]
    try:
        fit = least_squares(residuals, start, bounds=(lower, upper),
                            x_scale=[0.3, 0.3, 1.0, 0.05], max_nfev=80)
    except (ValueError, np.linalg.LinAlgError):
        return None
    flux, flux_err, m = solve(fit.x)
    chi2 = float((((data - flux * m) * sw)[ok] ** 2).sum())
    angle_fit = float((fit.x[3] + np.pi / 2) % np.pi - np.pi / 2)
    return TrailFit(x=float(fit.x[0]), y=float(fit.x[1]), length=float(abs(fit.x[2])),
                    angle=angle_fit, flux=flux, flux_err=float(flux_err), chi2=chi2,
                    ndata=int(ok.sum()))


def measure_trails(table: pd.DataFrame, difference: Exposure, usable: np.ndarray,
                   scale: np.ndarray, snr: np.ndarray, min_elongation: float, min_snr: float,
                   max_length: float) -> None:
    """Trail columns of the DiaSource ``table`` (in place): elongated sources (major/minor
    axis ratio over the PSF's above ``min_elongation``, S/N above ``min_snr``, not dipoles)
    get a trail fit; footprints longer than ``max_length`` px are satellite streaks, flagged
    and not fitted. ``scale`` is the local pixel scale (arcsec/px) of each source."""
    ixx, iyy, ixy = (table[c].to_numpy(np.float64) for c in ("ixx", "iyy", "ixy"))
    pxx, pyy, pxy = (table[c].to_numpy(np.float64) for c in ("ixxPSF", "iyyPSF", "ixyPSF"))

    def axes(a, b, c):
        mean, diff = 0.5 * (a + b), np.sqrt(0.25 * (a - b) ** 2 + c**2)
        return mean + diff, np.maximum(mean - diff, 1e-12)

    major, minor = axes(ixx, iyy, ixy)
    pmajor, pminor = axes(pxx, pyy, pxy)
    with np.errstate(invalid="ignore", divide="ignore"):
        elongation = np.sqrt(major / minor) / np.sqrt(pmajor / pminor)
    candidates = np.flatnonzero((elongation > min_elongation)
                                & (snr > min_snr)
                                & ~table["isDipole"].to_numpy(bool))
    calib = difference.photo_calib
    n = len(table)
    cols = {c: np.full(n, np.nan) for c in (
        "trailRa", "trailDec", "trailLength", "trailAngle", "trailFlux", "trailFluxErr",
        "trailChi2")}
    cols["trailNdata"] = np.zeros(n, np.int64)
    flag, flag_edge = np.zeros(n, bool), np.zeros(n, bool)
    height, width = difference.shape
    for i in candidates:
        # Moments of a segment of length L convolved with the PSF: major = psf + L^2 / 12.
        if table.at[i, "bboxSize"] > max_length:
            flag[i] = True  # a satellite streak (its footprint says how long): not fitted
            continue
        length0 = np.sqrt(max(12.0 * (major[i] - pmajor[i]), 1.0)) / scale[i]
        angle0 = 0.5 * np.arctan2(2 * ixy[i], ixx[i] - iyy[i])
        x, y = float(table.at[i, "x"]), float(table.at[i, "y"])
        sign = -1.0 if table.at[i, "isNegative"] else 1.0
        fit = fit_trail(sign * difference.image, difference.variance, usable, difference.psf,
                        x, y, length0, angle0)
        if fit is None:
            flag[i] = True
            continue
        half = 0.5 * fit.length
        x0, y0 = fit.x - half * np.cos(fit.angle), fit.y - half * np.sin(fit.angle)
        x1, y1 = fit.x + half * np.cos(fit.angle), fit.y + half * np.sin(fit.angle)
        ra, dec = difference.pixel_to_sky(np.array([fit.x]), np.array([fit.y]))
        cols["trailRa"][i], cols["trailDec"][i] = ra[0], dec[0]
        cols["trailLength"][i] = fit.length * scale[i]
        cols["trailAngle"][i] = position_angle(difference, np.array([x0]), np.array([y0]),
                                         np.array([x1]), np.array([y1]))[0] % 180.0
        cols["trailFlux"][i] = sign * calib.to_njy(fit.flux)
        cols["trailFluxErr"][i] = calib.to_njy(fit.flux_err)
        cols["trailChi2"][i] = fit.chi2
        cols["trailNdata"][i] = fit.ndata
        flag_edge[i] = (min(x0, x1) < 0 or min(y0, y1) < 0 or max(x0, x1) > width - 1
                        or max(y0, y1) > height - 1)
    for name, values in cols.items():
        table[name] = values
    table["trail_flag"], table["trail_flag_edge"] = flag, flag_edge
