"""Alard-Lupton PSF matching with a spatially varying kernel, and the decorrelation afterburner.

The kernel is a sum of Gaussian x polynomial basis functions (Alard & Lupton 1998) whose
coefficients vary linearly over the image; the first basis function carries the kernel sum (the
photometric ratio) and is kept spatially constant, the others are made to sum to zero. Because
the spatial variation is linear in the coefficients, convolving the whole image needs only three
FFT convolutions (one per spatial term). The difference is then decorrelated (Rubin DMTN-179):
its noise spectrum is flattened by ``sqrt((u_var + c_var kSum^2) / (u_var + c_var |K(k)|^2))``,
and its PSF is the science PSF seen through the same filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.fft as sfft
import sep
from pydantic import Field
from scipy.signal import fftconvolve

from apqa.config import ConfigModel
from apqa.datamodel import Exposure, GridPsf, Mask, PolynomialPsf, Psf
from apqa.errors import StageError
from apqa.pipeline.detect import detect_sources

SIGMA_TO_FWHM = 2.3548
_STAMP_FLAGS = ("SAT", "BAD", "CR", "NO_DATA", "INTRP", "EDGE")


class AlConfig(ConfigModel):
    """Alard-Lupton settings (Rubin's defaults where they exist)."""

    basis_sigma_factors: tuple[float, ...] = Field(
        (0.5, 1.0, 2.0), description="basis Gaussian sigmas in units of the matching sigma")
    basis_degrees: tuple[int, ...] = Field((4, 2, 2), description="polynomial degree per Gaussian")
    min_kernel_size: int = 21
    max_kernel_size: int = 35
    spatial_order: int = Field(1, ge=0, le=1, description="kernel spatial variation")
    background_order: int = Field(2, ge=0, le=2, description="differential background")
    candidate_min_snr: float = 10.0
    candidate_max_snr: float = 500.0
    cell_size: int = Field(128, description="candidate grid cell (pixels)")
    per_cell: int = Field(5, description="brightest candidates kept per cell")
    max_candidates: int = Field(150, description="cap on kernel stamps (the fit's cost)")
    min_candidates: int = Field(3, description="fewer usable stamps: StageError")
    min_spatial_candidates: int = Field(
        15, description="fewer stamps: spatially constant kernel and background")
    clip_sigma: float = 3.0
    n_clip: int = 3
    decorrelate: bool = True
    residual_background_mesh: int | None = Field(
        256, ge=32, description="mesh (px) of the background left in the difference, measured "
                                "on pixels no source touches and removed (None: keep it). The "
                                "differential background fitted in kernel stamps is poorly "
                                "constrained (the broad kernel bases mimic a constant)")


@dataclass
class DiffimResult:
    """A difference image and its quality numbers."""

    difference: Exposure
    quality: dict[str, float] = field(default_factory=dict)
    kernel: np.ndarray | None = None  # the matching kernel at the image centre
    template: Exposure | None = None  # the template on the science grid (warped if needed)


def _gaussian_poly_basis(sigmas: list[float], degrees: tuple[int, ...], half: int) -> np.ndarray:
    """Alard-Lupton basis: x^i y^j exp(-r^2 / 2 sigma^2), orthogonalized for a fixed sum.

    Returns (n, k, k): element 0 sums to 1, all others sum to 0.
    """
    off = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    raw = []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        g = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        for d in range(degree + 1):
            for j in range(d + 1):
                raw.append(g * (xx / sigma) ** (d - j) * (yy / sigma) ** j)
    basis = [raw[0] / raw[0].sum()]
    for b in raw[1:]:
        total = b.sum()
        b = b / np.abs(b).max()
        if abs(total) > 1e-12 * np.abs(b).sum():
            b = b / (total / 1.0) - basis[0]  # sum 0: changes shape, never the photometric ratio
            b = b / np.abs(b).max()
        basis.append(b)
    return np.stack(basis)


def _spatial_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    terms = [np.ones_like(u)]
    if order >= 1:
        terms += [u, v]
    if order >= 2:
        terms += [u * u, u * v, v * v]
    return np.stack(terms, axis=-1)


def _background_image(uu: np.ndarray, vv: np.ndarray, order: int,
                      coeffs: np.ndarray) -> np.ndarray:
    """The fitted differential background from row/column coordinate vectors."""
    terms = [np.float32(1.0), uu, vv, uu * uu, uu * vv, vv * vv][:len(coeffs)]
    out = np.zeros((vv.shape[0], uu.shape[1]), np.float32)
    for c, t in zip(coeffs, terms, strict=True):
        out += c * t
    return out


def _detect_candidates(target: Exposure, fwhm: float, config: AlConfig) -> pd.DataFrame:
    """Sources of the target image above the candidate S/N (x, y, snr)."""
    masked = target.mask.is_set(["NO_DATA", "BAD", "SAT"])
    found, _ = detect_sources(target.image, target.variance, masked, fwhm,
                              threshold=config.candidate_min_snr)
    return pd.DataFrame({"x": found["x"], "y": found["y"], "snr": found["peak_snr"]})


def _select_candidates(candidates: pd.DataFrame, target: Exposure, other: Exposure,
                       stamp_half: int, config: AlConfig) -> tuple[np.ndarray, np.ndarray]:
    """Clean candidates spread over the image: up to ``per_cell`` per grid cell, brightest
    first, none whose stamp touches a flagged pixel in either image."""
    snr = candidates["snr"].to_numpy(float)
    x, y = candidates["x"].to_numpy(float), candidates["y"].to_numpy(float)
    margin = stamp_half + 2
    ok = ((snr >= config.candidate_min_snr) & (snr < config.candidate_max_snr)
          & (x > margin) & (y > margin)
          & (x < target.width - 1 - margin) & (y < target.height - 1 - margin))
    bad = target.mask.is_set([p for p in _STAMP_FLAGS if p in target.mask.planes]) | \
        other.mask.is_set([p for p in _STAMP_FLAGS if p in other.mask.planes])
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    # Reject stamps touching flagged pixels in either image (summed-area table lookup).
    table = np.pad(bad.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h = stamp_half
    y0, y1 = np.clip(iy - h, 0, target.height), np.clip(iy + h + 1, 0, target.height)
    x0, x1 = np.clip(ix - h, 0, target.width), np.clip(ix + h + 1, 0, target.width)
    n_bad = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    ok &= n_bad == 0
    idx = np.nonzero(ok)[0]
    cell = (iy[idx] // config.cell_size) * 100_000 + ix[idx] // config.cell_size
    order = np.lexsort((-snr[idx], cell))
    # Rank within each cell (cells sorted, brightest first): keep the first per_cell.
    sorted_cells = cell[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_cells))[0] + 1]
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    keep = idx[order][rank < config.per_cell]
    if keep.size > config.max_candidates:
        # Spread the cap over the image: the brightest of each cell first, then the next ones.
        by_rank = np.argsort(rank[rank < config.per_cell], kind="stable")
        keep = keep[by_rank[:config.max_candidates]]
    return ix[keep], iy[keep]


def _stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    off = np.arange(-half, half + 1)
    return image[iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]


def _convolve_stamps(ref: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """'valid' convolution of each reference stamp (n, m + 2h, m + 2h) with each basis kernel
    (b, 2h + 1, 2h + 1): returns (n, b, m, m)."""
    _n, big, _ = ref.shape
    _nb, k, _ = basis.shape
    size = sfft.next_fast_len(big + k - 1, real=True)
    fr = sfft.rfft2(ref, s=(size, size), workers=-1)
    fb = sfft.rfft2(basis, s=(size, size), workers=-1)
    out = sfft.irfft2(fr[:, None] * fb[None], s=(size, size), workers=-1)
    m = big - k + 1
    return out[..., k - 1:k - 1 + m, k - 1:k - 1 + m]


def _fft_convolve_same(image: np.ndarray, kernels: list[np.ndarray]) -> list[np.ndarray]:
    """Convolve ``image`` with each kernel ('same' size, zero padding), sharing its FFT."""
    k = kernels[0].shape[0]
    h = k // 2
    shape = (image.shape[0] + k - 1, image.shape[1] + k - 1)
    fast = (sfft.next_fast_len(shape[0], real=True), sfft.next_fast_len(shape[1], real=True))
    fi = sfft.rfft2(image.astype(np.float32), s=fast, workers=-1)
    outs = []
    for kernel in kernels:
        fk = sfft.rfft2(kernel.astype(np.float32), s=fast, workers=-1)
        full = sfft.irfft2(fi * fk, s=fast, workers=-1)
        outs.append(full[h:h + image.shape[0], h:h + image.shape[1]].astype(np.float32))
    return outs


def decorrelation_kernel(kernel: np.ndarray, unconvolved_var: float, convolved_var: float,
                         size: int) -> np.ndarray:
    """Real-space decorrelation filter (centred, ``size`` x ``size``) for a matching kernel.

    ``corr(k) = sqrt((u_var + c_var kSum^2) / (u_var + c_var |K(k)|^2))``; corr(0) = 1, so flux is
    preserved.
    """
    n = max(size, 2 * kernel.shape[0]) * 2
    padded = np.zeros((n, n))
    h = kernel.shape[0] // 2
    padded[:kernel.shape[0], :kernel.shape[1]] = kernel
    padded = np.roll(padded, (-h, -h), axis=(0, 1))  # kernel centre at pixel (0, 0)
    ft = np.fft.fft2(padded)
    ksum = kernel.sum()
    corr = np.sqrt((unconvolved_var + convolved_var * ksum**2)
                   / (unconvolved_var + convolved_var * np.abs(ft) ** 2))
    phi = np.real(np.fft.ifft2(corr))
    phi = np.roll(phi, (size // 2, size // 2), axis=(0, 1))[:size, :size]
    return phi / phi.sum()


def _convolve_psf(psf: Psf, kernel: np.ndarray, shape: tuple[int, int]) -> Psf:
    """The PSF seen through ``kernel`` (spatially constant), as the same kind of model."""
    # 'full' convolution cropped to the PSF size plus the kernel's reach: the broadened PSF
    # must not lose its wings (flux) to the original stamp size.
    def widen(img: np.ndarray) -> np.ndarray:
        full = fftconvolve(img, kernel, mode="full")
        size = min(full.shape[0], img.shape[0] + 2 * (kernel.shape[0] // 2)) | 1
        start = (full.shape[0] - size) // 2
        return full[start:start + size, start:start + size]

    if isinstance(psf, PolynomialPsf):
        coeffs = np.stack([widen(c) for c in psf.coefficients])
        return PolynomialPsf(psf.width, psf.height, coeffs, psf.order)
    grid = psf.to_grid() if hasattr(psf, "to_grid") else GridPsf(
        np.array([(shape[1] - 1) / 2]), np.array([(shape[0] - 1) / 2]),
        psf.image_at((shape[1] - 1) / 2, (shape[0] - 1) / 2)[None, None])
    images = np.stack([[widen(img) for img in row] for row in grid.images])
    return GridPsf(grid.nodes_x, grid.nodes_y, images)


def _psf_through_kernel(psf: Psf, kernels: list[np.ndarray], phi: np.ndarray | None,
                        ksum: float, shape: tuple[int, int], nodes: tuple[int, int] = (3, 5)
                        ) -> GridPsf:
    """PSF of a science point source on a convolve-science difference: the science PSF through
    the spatially varying kernel (evaluated at each grid node) and the decorrelation filter."""
    height, width = shape
    xs = np.linspace(0, width - 1, nodes[0])
    ys = np.linspace(0, height - 1, nodes[1])
    rows = []
    for y in ys:
        row = []
        for x in xs:
            u = (x - (width - 1) / 2) / (width / 2)
            v = (y - (height - 1) / 2) / (height / 2)
            kernel = kernels[0] + (u * kernels[1] + v * kernels[2] if len(kernels) > 1 else 0)
            image = fftconvolve(psf.image_at(x, y), kernel / ksum, mode="full")
            if phi is not None:
                image = fftconvolve(image, phi, mode="full")
            row.append(image)
        rows.append(row)
    return GridPsf(xs, ys, np.array(rows))


def _robust_var(image: np.ndarray, variance: np.ndarray, good: np.ndarray) -> float:
    values = variance[good & np.isfinite(variance)]
    return float(np.median(values)) if values.size else float("nan")


def _residual_background(diff: np.ndarray, sky: np.ndarray, mesh: int) -> np.ndarray:
    """Smooth background of ``diff`` from its ``sky`` pixels (sep meshes, 3x3 median filter)."""
    height, width = diff.shape
    mesh = min(mesh, height, width)
    bkg = sep.Background(np.ascontiguousarray(diff, np.float32), mask=~sky, bw=mesh, bh=mesh,
                         fw=3, fh=3)
    return bkg.back()


def residual_footprint_ratio(diff: np.ndarray, variance: np.ndarray, ix: np.ndarray,
                             iy: np.ndarray, half: int) -> float:
    """Median over stars of the rms of D / sqrt(V) in a (2 half + 1)^2 box on each star.

    1 when the stars subtract down to the noise; a poor kernel leaves it well above 1.
    """
    if ix.size == 0:
        return float("nan")
    d = _stamps(diff, ix, iy, half).astype(np.float64)
    v = _stamps(variance, ix, iy, half).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = np.where(np.isfinite(v) & (v > 0), d * d / v, np.nan)
    return float(np.nanmedian(np.sqrt(np.nanmean(z2, axis=(1, 2)))))


def al_subtract(science: Exposure, template: Exposure, config: AlConfig | None = None,
                candidates: pd.DataFrame | None = None) -> DiffimResult:
    """Difference ``science - matched template`` in science flux units, decorrelated.

    Both exposures must be on the same pixel grid, background-subtracted, with PSF models and
    variance planes. The sharper image is convolved (Rubin's ``auto`` choice). ``candidates``
    (x, y, snr of static sources, e.g. from characterization) saves a detection pass; by default
    the unconvolved image is searched.

    Raises
    ------
    StageError
        Too few clean kernel candidates (the message gives the count found).
    """
    config = config or AlConfig()
    if science.shape != template.shape:
        raise StageError(f"AL: science {science.shape} and template {template.shape} differ "
                         "in shape; warp the template first")
    if science.psf is None or template.psf is None:
        raise StageError("AL: both images need a PSF model")
    cx, cy = (science.width - 1) / 2, (science.height - 1) / 2
    fwhm_s, fwhm_t = science.psf.fwhm_at(cx, cy), template.psf.fwhm_at(cx, cy)
    convolve_template = fwhm_t <= fwhm_s
    target, ref = (science, template) if convolve_template else (template, science)
    sig_t = max(fwhm_s, fwhm_t) / SIGMA_TO_FWHM
    sig_r = min(fwhm_s, fwhm_t) / SIGMA_TO_FWHM
    sigma_match = float(np.sqrt(max(sig_t**2 - sig_r**2, 0.5**2)))
    sigmas = [max(0.4, f * sigma_match) for f in config.basis_sigma_factors]
    size = int(np.clip(2 * np.ceil(3 * max(sigmas)) + 1, config.min_kernel_size,
                       config.max_kernel_size)) | 1
    half = size // 2
    basis = _gaussian_poly_basis(sigmas, config.basis_degrees, half)
    stamp_half = half + int(np.ceil(max(fwhm_s, fwhm_t)))
    if candidates is None:
        candidates = _detect_candidates(target, max(fwhm_s, fwhm_t), config)
    ix, iy = _select_candidates(candidates, target, ref, stamp_half + half, config)
    if ix.size < config.min_candidates:
        raise StageError(f"AL: too few kernel candidates: found {ix.size} clean stars with "
                         f"S/N {config.candidate_min_snr:g}-{config.candidate_max_snr:g}, need "
                         f"{config.min_candidates}")
    tgt = _stamps(target.image, ix, iy, stamp_half).astype(np.float64)
    tvar = _stamps(target.variance, ix, iy, stamp_half).astype(np.float64)
    rvar = _stamps(ref.variance, ix, iy, stamp_half).astype(np.float64)
    conv = _convolve_stamps(_stamps(ref.image, ix, iy, stamp_half + half).astype(np.float64),
                            basis)  # (n, b, m, m)
    u = (ix - cx) / (science.width / 2)
    v = (iy - cy) / (science.height / 2)
    # Small images hold few stars: then the kernel and background cannot vary spatially.
    few = ix.size < config.min_spatial_candidates
    spatial_order = 0 if few else config.spatial_order
    background_order = 0 if few else config.background_order
    kterms = _spatial_terms(u, v, spatial_order)  # (n, s)
    bterms = _spatial_terms(u, v, background_order)  # (n, q)
    n, nb, m, _ = conv.shape
    ns, nq = kterms.shape[1], bterms.shape[1]
    # Columns: basis 0 (constant), basis 1.. x spatial terms, background terms.
    cols = [conv[:, 0]]
    for b in range(1, nb):
        for s in range(ns):
            cols.append(conv[:, b] * kterms[:, s, None, None])
    for q in range(nq):
        cols.append(np.broadcast_to(bterms[:, q, None, None], (n, m, m)))
    design = np.stack(cols, axis=1).reshape(n, len(cols), m * m)  # (n, p, m*m)
    data = tgt.reshape(n, m * m)
    used = np.ones(n, bool)
    for _ in range(config.n_clip + 1):
        sw = 1.0 / np.sqrt(np.clip(tvar + rvar, 1e-12, None).reshape(n, m * m))
        # Weighted design as one (p, n*m*m) matrix: the normal equations are a single matmul.
        aw = (design[used] * sw[used, None, :]).transpose(1, 0, 2).reshape(design.shape[1], -1)
        normal = aw @ aw.T
        rhs = aw @ (data[used] * sw[used]).ravel()
        coeffs = np.linalg.solve(normal, rhs)
        w = sw**2
        model = np.einsum("npk,p->nk", design, coeffs)
        chi2 = ((data - model) ** 2 * w).sum(axis=1) / (m * m)
        med = np.median(chi2[used])
        mad = 1.4826 * np.median(np.abs(chi2[used] - med))
        new = chi2 < med + config.clip_sigma * max(mad, 0.05 * med)
        if np.array_equal(new, used) or new.sum() < config.min_candidates:
            break
        used = new
    condition = float(np.linalg.cond(normal))
    # Kernel images per spatial term: K = K0 + u K1 + v K2.
    c0 = coeffs[0]
    ck = coeffs[1:1 + (nb - 1) * ns].reshape(nb - 1, ns)
    cb = coeffs[1 + (nb - 1) * ns:]
    kernels = [c0 * basis[0] + np.tensordot(ck[:, 0], basis[1:], axes=1)]
    for s in range(1, ns):
        kernels.append(np.tensordot(ck[:, s], basis[1:], axes=1))
    kernel_c = kernels[0]
    ksum = float(kernel_c.sum())

    height, width = science.shape
    # Row and column vectors: broadcasting avoids two full-size coordinate images.
    uu = ((np.arange(width, dtype=np.float32) - np.float32(cx)) / np.float32(width / 2))[None, :]
    vv = ((np.arange(height, dtype=np.float32) - np.float32(cy))
          / np.float32(height / 2))[:, None]
    ref_data = np.where(ref.mask.is_set("NO_DATA"), 0, ref.image)
    parts = _fft_convolve_same(ref_data, kernels)
    matched = parts[0]
    if ns > 1:
        matched += uu * parts[1] + vv * parts[2]
    background = _background_image(uu, vv, background_order, cb.astype(np.float32))
    diff = target.image - matched - background

    good = ~(science.mask.is_set(["NO_DATA", "SAT", "BAD"])
             | template.mask.is_set(["NO_DATA", "SAT", "BAD"]))
    if config.residual_background_mesh:
        diff = diff - _residual_background(diff, good & ~(
            science.mask.is_set(["DETECTED", "CR"]) | template.mask.is_set(["DETECTED", "CR"])),
            config.residual_background_mesh)
    u_var = _robust_var(target.image, target.variance, good)
    c_var = _robust_var(ref.image, ref.variance, good)
    psf = science.psf
    if config.decorrelate:
        phi = decorrelation_kernel(kernel_c, u_var, c_var, 2 * size + 1)
        diff = _fft_convolve_same(diff, [phi])[0]
        variance = target.variance + ksum**2 * ref.variance
    else:
        phi = None
        ref_var = np.where(np.isfinite(ref.variance), ref.variance, 0)
        variance = target.variance + _fft_convolve_same(ref_var, [kernel_c**2])[0]
    if convolve_template:
        if phi is not None:
            psf = _convolve_psf(science.psf, phi, science.shape)
    else:
        # D = (K * S - T) / kSum: a science point source appears through K (and phi).
        diff = -diff / ksum
        variance = variance / ksum**2
        psf = _psf_through_kernel(science.psf, kernels, phi, ksum, science.shape)

    # Both inputs use the default plane map; injected sources keep their INJECTED (science)
    # and INJECTED_TEMPLATE (template) bits.
    mask = Mask(science.mask.array | template.mask.array, science.mask.planes)
    no_data = mask.is_set("NO_DATA")
    diff = np.where(no_data, 0, diff).astype(np.float32)
    variance = np.where(no_data, np.inf, variance).astype(np.float32)
    out = Exposure(diff, variance, mask, psf=psf, wcs=science.wcs,
                   photo_calib=science.photo_calib, visit_info=science.visit_info,
                   detector_info=science.detector_info)
    # The kernel sum at the image corners (u, v = +-1) against the centre: the photometric
    # scaling's spatial variation.
    corner_sums = [ksum + su * float(kernels[1].sum()) + sv * float(kernels[2].sum())
                   for su in (-1, 1) for sv in (-1, 1)] if ns > 1 else [ksum]
    quality = {
        "kernel_sum": ksum,
        "kernel_sum_variation": float(np.ptp(corner_sums) / abs(ksum)),
        "residual_footprint_ratio": residual_footprint_ratio(
            diff, variance, ix[used], iy[used], int(np.ceil(max(fwhm_s, fwhm_t)))),
        "condition_number": condition,
        "n_kernel_candidates": float(n),
        "n_kernel_used": float(used.sum()),
        "convolved": 0.0 if convolve_template else 1.0,
        "kernel_size": float(size),
    }
    return DiffimResult(out, quality, kernel_c)
