"""ZOGY's PSF and kernel preparation: PSF kernels at a position (normalized, optionally
re-centred), their placement on FFT grids, and the real-space ZOGY kernels.

Split from :mod:`apqa.pipeline.diffim.zogy`, which holds the public API and the main flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft

from apqa.datamodel import Exposure, Psf, measure_fwhm, shift_kernels
from apqa.errors import InputError, StageError

SIGMA_TO_FWHM = 2.3548


@dataclass
class _Kernels:
    """Real-space ZOGY kernels, centred and odd-sized, for D (science units) and for S."""

    d_science: np.ndarray   # k_dn: D = k_dn (x) N - k_dr (x) R
    d_template: np.ndarray  # k_dr
    psf_d: np.ndarray       # P_D
    s_science: np.ndarray | None   # k_sn = k_dn (x) P_D(-x): S = k_sn (x) N - k_sr (x) R
    s_template: np.ndarray | None  # k_sr (both None when made without the score's kernels)
    score_psf: np.ndarray   # P_D (x) P_D(-x), peak 1
    flux_zero_point: float  # F_D
    truncation: float       # largest fraction of a kernel's sum of squares lost by the crop
    radius: int             # half-width of the D and S kernels


def _windowed_centroid(kernel: np.ndarray, sigma: float) -> tuple[float, float]:
    """Gaussian-windowed centroid of a kernel relative to its central pixel (SExtractor XWIN).

    The window makes the estimate follow the core, as centroids measured on the images do, so
    wings (or an asymmetric halo) do not pull it.
    """
    half = kernel.shape[0] // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    cx = cy = 0.0
    for _ in range(30):
        w = kernel * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        total = w.sum()
        if not total > 0:
            return 0.0, 0.0
        dx = 2.0 * float((w * (xx - cx)).sum() / total)
        dy = 2.0 * float((w * (yy - cy)).sum() / total)
        cx, cy = cx + dx, cy + dy
        if abs(dx) < 1e-6 and abs(dy) < 1e-6:
            break
    return cx, cy


def _psf_kernel(psf: Psf, x: float, y: float, recenter: bool, name: str
                ) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The PSF at (x, y) as a float64 kernel summing to 1, its FWHM and any centring shift.

    ``image_at`` promises a kernel centred on its central pixel. With ``recenter`` its windowed
    centroid is measured and, if it is off by more than 1e-3 px, the kernel is shifted (Fourier
    phase ramp) to put it exactly there: both images were registered on their stars' centroids,
    so any offset between the two PSF models would leave a dipole on every star.
    """
    kernel = np.asarray(psf.image_at(x, y), np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise InputError(f"{name}.psf: image_at must return an odd-sized square kernel, "
                         f"got shape {kernel.shape}")
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise InputError(f"{name}.psf: kernel at ({x:.1f}, {y:.1f}) does not have a positive "
                         "finite sum")
    kernel = kernel / total
    fwhm = measure_fwhm(kernel)
    if not np.isfinite(fwhm):
        # HSM failed (odd shapes): fall back to the second moments of the kernel.
        half = kernel.shape[0] // 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        fwhm = SIGMA_TO_FWHM * float(np.sqrt(0.5 * (kernel * (xx**2 + yy**2)).sum()))
    shift = (0.0, 0.0)
    if recenter:
        cx, cy = _windowed_centroid(kernel, fwhm / SIGMA_TO_FWHM)
        if math.hypot(cx, cy) > 1e-3:
            kernel = shift_kernels(kernel[None].astype(np.float32), np.array([-cx]),
                                   np.array([-cy]))[0].astype(np.float64)
            kernel /= kernel.sum()
            shift = (-cx, -cy)
    return kernel, float(fwhm), shift


def _embed_centred(kernel: np.ndarray, shape: tuple[int, int],
                   dtype: type = np.float32) -> np.ndarray:
    """Put an odd, centred kernel on an FFT grid with its centre pixel at index (0, 0).

    This is ``ifftshift`` of the kernel zero-padded to ``shape``: the kernel's negative offsets
    wrap to the far ends, so its transform has no linear phase (no sub-pixel shift) at all.
    """
    size = kernel.shape[0]
    half = size // 2
    if size > shape[0] or size > shape[1]:
        raise StageError(f"kernel of size {size} does not fit the FFT grid {shape}")
    out = np.zeros(shape, dtype)
    out[:half + 1, :half + 1] = kernel[half:, half:]
    out[:half + 1, shape[1] - half:] = kernel[half:, :half]
    out[shape[0] - half:, :half + 1] = kernel[:half, half:]
    out[shape[0] - half:, shape[1] - half:] = kernel[:half, :half]
    return out


def _centred_crop(periodic: np.ndarray, size: int) -> np.ndarray:
    """The inverse of :func:`_embed_centred`: an odd ``size`` kernel centred on its middle."""
    half = size // 2
    rows = np.r_[periodic.shape[0] - half:periodic.shape[0], 0:half + 1]
    cols = np.r_[periodic.shape[1] - half:periodic.shape[1], 0:half + 1]
    return periodic[np.ix_(rows, cols)]


def _outside_power(kernel: np.ndarray) -> np.ndarray:
    """Fraction of a periodic kernel's sum of squares outside each half-width r = 0, 1, ...

    ``kernel`` has its origin at index (0, 0) (FFT layout); distances are Chebyshev (square
    crops).
    """
    dy = np.minimum(np.arange(kernel.shape[0]), kernel.shape[0] - np.arange(kernel.shape[0]))
    dx = np.minimum(np.arange(kernel.shape[1]), kernel.shape[1] - np.arange(kernel.shape[1]))
    dist = np.maximum(dy[:, None], dx[None, :])
    power = np.bincount(dist.ravel(), weights=(kernel**2).ravel())
    return 1.0 - np.cumsum(power) / power.sum()


def _soft_edge(kernel: np.ndarray, width: float = 5.0) -> np.ndarray:
    """The kernel rolled off to zero over its outermost ``width`` pixels of radius (raised
    cosine, circular; at most 40% of the stamp's radius, so small stamps keep their core),
    renormalized.

    A PSF stamp ends in a step: fitted models stand on a floor of 1-2e-3 of their peak
    (measured on the 4096x4096 bench pair). Its transform then ripples like a sinc where it
    is smallest, and ZOGY's kernels, ratios of the two transforms, carry those ripples out as
    tails: on that pair 0.3% of a kernel's power lay beyond 64 px with hard stamp edges and
    3e-5 with soft ones (kernel radius 128, the cap, against 74 px at a tolerance of 1e-5).
    """
    half = kernel.shape[0] // 2
    width = min(width, 0.4 * (half + 0.5))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    t = np.clip((half + 0.5 - np.hypot(xx, yy)) / width, 0.0, 1.0)
    soft = kernel * (0.5 - 0.5 * np.cos(np.pi * t))
    return soft / soft.sum()


def _zogy_kernels(psf_science: np.ndarray, psf_template: np.ndarray, sigma_science: float,
                  sigma_template: float, flux_ratio: float, epsilon: float,
                  radius: int | None, tolerance: float, max_radius: int,
                  psf_size: int, with_score: bool = True) -> _Kernels:
    """ZOGY's kernels in real space, from the two PSFs, noise levels and flux ratio.

    They are computed in float64 on a grid of about four times ``max_radius``, where the
    transforms of both PSFs keep their full dynamic range, then cropped to ``2 radius + 1``
    pixels; with ``radius`` None, to the smallest half-width that keeps all but
    ``tolerance`` of every kernel's power. PSF models cut by their stamp's edge have
    transforms that ripple, and kernels whose tails fall only as a power of the distance
    (a few 1e-3 of their power beyond the stamp size for fitted PSFs): cropped too tightly
    they leave rings around bright stars. Cropped D kernels are rescaled to their exact sums,
    so fluxes are conserved and constant stars leave no net flux whatever the crop.

    Far from the origin of Fourier space both PSF transforms fall towards rounding noise; the
    ratio of two rounding errors would put random structure into the kernels, so ``den^2``
    gets ``epsilon`` times its zero-frequency value added, which rolls the kernels off
    smoothly where neither image holds any signal.

    Without ``with_score`` the score's two kernels are not made (a third fewer transforms);
    the truncation is then that of the D kernels.
    """
    psf_science, psf_template = _soft_edge(psf_science), _soft_edge(psf_template)
    m = sfft.next_fast_len(4 * max_radius + 2, real=True)
    # Both PSFs, then all six kernels, in one batched transform each.
    pn, pr = sfft.rfft2(np.stack([_embed_centred(psf_science, (m, m), np.float64),
                                  _embed_centred(psf_template, (m, m), np.float64)]))
    fr, sn2, sr2 = flux_ratio, sigma_science**2, sigma_template**2
    den2_0 = sn2 * fr**2 + sr2
    den = np.sqrt(sn2 * fr**2 * np.abs(pr) ** 2 + sr2 * np.abs(pn) ** 2 + epsilon * den2_0)
    f_d = fr / math.sqrt(den2_0)
    # Science units: the paper's D divided by F_D (F_n = 1), so fluxes are science counts.
    kdn_hat = fr * pr / (f_d * den)
    kdr_hat = pn / (f_d * den)
    pd_hat = fr * pr * pn / (f_d * den)
    # The score up to the constant F_D^2, which cancels in S_corr: S = D (x) P_D(-x).
    pd_conj = np.conj(pd_hat)
    specs = {"d_science": kdn_hat, "d_template": kdr_hat, "psf_d": pd_hat,
             "score_psf": pd_hat * pd_conj}
    names = ("d_science", "d_template")
    if with_score:
        specs.update(s_science=kdn_hat * pd_conj, s_template=kdr_hat * pd_conj)
        names = (*names, "s_science", "s_template")
    full = dict(zip(specs, sfft.irfft2(np.stack(list(specs.values())), s=(m, m)),
                    strict=True))
    if radius is None:
        outside = np.max([_outside_power(full[n])[:max_radius + 1] for n in names], axis=0)
        fits = np.nonzero(outside <= tolerance)[0]
        radius = int(fits[0]) if fits.size else max_radius
        radius = max(radius, psf_size // 2)
    radius = min(radius, max_radius)
    size = 2 * radius + 1
    cropped, truncation = {}, 0.0
    for name in names:
        kernel = _centred_crop(full[name], size)
        # The crop holds every pixel within Chebyshev distance ``radius``: what it leaves out.
        truncation = max(truncation, 1.0 - float(np.sum(kernel**2) / np.sum(full[name] ** 2)))
        # Exact sum: the transform at zero frequency.
        cropped[name] = kernel * (float(specs[name][0, 0].real) / kernel.sum())
    psf_d = _centred_crop(full["psf_d"], psf_size)
    psf_d = psf_d / psf_d.sum()
    score_psf = _centred_crop(full["score_psf"], psf_size)
    score_psf = score_psf / score_psf[psf_size // 2, psf_size // 2]
    return _Kernels(cropped["d_science"], cropped["d_template"], psf_d, cropped.get("s_science"),
                    cropped.get("s_template"), score_psf, f_d, max(truncation, 0.0), radius)


def _cell_psf_kernels(science: Exposure, template: Exposure, cells_y: np.ndarray,
                      cells_x: np.ndarray, recenter: bool
                      ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(P_n, P_r, largest re-centring) at the centre of each cell, row by row."""
    assert science.psf is not None and template.psf is not None
    out = []
    for j in range(len(cells_y) - 1):
        for i in range(len(cells_x) - 1):
            x = (cells_x[i] + cells_x[i + 1] - 1) / 2.0
            y = (cells_y[j] + cells_y[j + 1] - 1) / 2.0
            pn, _, sn = _psf_kernel(science.psf, x, y, recenter, "science")
            pr, _, sr = _psf_kernel(template.psf, x, y, recenter, "template")
            out.append((pn, pr, max(math.hypot(*sn), math.hypot(*sr))))
    sizes = {(pn.shape, pr.shape) for pn, pr, _ in out}
    if len(sizes) > 1:
        raise InputError(f"psf: kernel sizes change over the image ({sorted(sizes)}); tiled "
                         "ZOGY needs one size")
    return out
