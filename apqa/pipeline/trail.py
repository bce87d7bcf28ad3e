"""Trail fit: a line segment convolved with the PSF, for elongated DIASources (fast asteroids,
satellites).

The model of a source moving at constant rate during the exposure is a uniform segment of
length L at angle theta, convolved with the PSF. The segment is drawn on a 4x super-sampled
grid, binned and convolved with the PSF image by FFT; centre, length and angle are fit by
nonlinear least squares with the flux solved linearly at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.fft import irfft2, next_fast_len, rfft2
from scipy.optimize import least_squares

from apqa.datamodel import Psf
from apqa.pipeline.photometry import fit_window

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
