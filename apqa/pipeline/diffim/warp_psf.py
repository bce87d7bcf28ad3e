"""The warped template's PSF: the template PSF seen through the local affine map of the warp
and interpolated with the warp's own kernel, on a grid of science positions.

Split from :mod:`apqa.pipeline.diffim.warp`, which holds the public API and the main flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from apqa.datamodel.psf import GridPsf, Psf, psf_stamps
from apqa.pipeline.diffim.warp_mapping import _exact_map, _local_jacobians
from apqa.pipeline.diffim.warp_resample import _PHASES, _TAP_OFFSETS

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from apqa.pipeline.diffim.warp import WarpConfig

#: Science pixels per node and axis whose sub-pixel phases the warped PSF averages over.
_PSF_PHASE_SAMPLES = 4


def _interpolate_stack(arrays: np.ndarray, x: np.ndarray, y: np.ndarray, kernel: str,
                       table: np.ndarray) -> np.ndarray:
    """Kernel interpolation of small arrays ``(M, k, k)`` at points ``(M, P)``; zero outside.

    ``table`` holds the kernel's weights at ``_PHASES + 1`` fractional positions (as the image
    path uses them). A plain (M, P, T, T) gather, for PSF stamps; the image path is
    :class:`_Resampler`.
    """
    offsets = np.asarray(_TAP_OFFSETS[kernel])
    pad = int(offsets.max()) + 1
    arrays = np.asarray(arrays, np.float32)
    m, k = arrays.shape[0], arrays.shape[1]
    padded = np.pad(arrays, ((0, 0), (pad, pad), (pad, pad)))
    # Positions far outside are moved to where every tap reads padding zeros.
    x = np.clip(np.asarray(x, float), -pad + 0.5, k + 1.0)
    y = np.clip(np.asarray(y, float), -pad + 0.5, k + 1.0)
    fx, fy = np.floor(x), np.floor(y)
    wx = table[:, ((x - fx) * _PHASES + 0.5).astype(np.intp)]  # (T, M, P)
    wy = table[:, ((y - fy) * _PHASES + 0.5).astype(np.intp)]
    cols = np.clip(fx.astype(np.intp)[..., None] + offsets + pad, 0, k + 2 * pad - 1)
    rows = np.clip(fy.astype(np.intp)[..., None] + offsets + pad, 0, k + 2 * pad - 1)
    index = np.arange(m)[:, None, None, None]
    block = padded[index, rows[..., :, None], cols[..., None, :]]  # (M, P, T, T)
    return np.einsum("mpji,jmp,imp->mp", block, wy, wx, optimize=True)


def _fit_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad or crop a centred odd kernel (or a stack of them) to ``size``."""
    k = kernel.shape[-1]
    if k == size:
        return kernel
    d = abs(size - k) // 2
    if k < size:
        return np.pad(kernel, [(0, 0)] * (kernel.ndim - 2) + [(d, d), (d, d)])
    return kernel[..., d:d + size, d:d + size]


def _warp_psf(psf: Psf, science_wcs: WCS, template_wcs: WCS, shape: tuple[int, int],
              template_shape: tuple[int, int], config: WarpConfig,
              table: np.ndarray) -> GridPsf:
    """The template PSF seen through the warp, on a grid of science positions.

    Each node kernel is what the warp makes of a point source centred on a science pixel near
    the node: the template PSF drawn at that pixel's template sub-pixel phase, interpolated with
    the warp's own kernel at the template positions of the surrounding science pixels (the
    local affine map). The interpolation blurs or sharpens by a few tenths of a percent
    depending on the phase (Lanczos-3 at a half-pixel shift makes a FWHM 3.5 px star 0.6%
    narrower in its moments), so the node kernel averages ``_PSF_PHASE_SAMPLES`` science pixels
    spread over the node's cell: exact for a pure shift, the local mean for the beat pattern of
    a rotation or scale change. Where the map is the identity and the phase zero, the template
    kernel is used as it is.
    """
    height, width = shape
    nx, ny = config.psf_grid
    nodes_x = np.linspace(0.0, width - 1.0, nx) if nx > 1 else np.array([(width - 1) / 2])
    nodes_y = np.linspace(0.0, height - 1.0, ny) if ny > 1 else np.array([(height - 1) / 2])
    xx, yy = np.meshgrid(nodes_x, nodes_y)
    x, y = xx.ravel(), yy.ravel()
    n_nodes = x.size
    jac = _local_jacobians(science_wcs, template_wcs, x, y)
    # Science pixels spread over each node's cell (clipped to the grid) and their template
    # positions; the PSF is evaluated at the node's template position (clipped to the template)
    # with each pixel's sub-pixel phase.
    cell_x = width / max(nx - 1, 1)
    cell_y = height / max(ny - 1, 1)
    spread = (np.arange(_PSF_PHASE_SAMPLES) + 0.5) / _PSF_PHASE_SAMPLES - 0.5
    sx = np.rint(np.clip(x[:, None, None] + cell_x * spread[None, None, :], 0, width - 1))
    sy = np.rint(np.clip(y[:, None, None] + cell_y * spread[None, :, None], 0, height - 1))
    sx, sy = np.broadcast_arrays(sx, sy)
    n_samples = sx.shape[1] * sx.shape[2]
    su, sv = _exact_map(science_wcs, template_wcs, sx.ravel(), sy.ravel())
    phase_u = np.nan_to_num(su - np.rint(su)).reshape(n_nodes, n_samples)
    phase_v = np.nan_to_num(sv - np.rint(sv)).reshape(n_nodes, n_samples)
    u, v = _exact_map(science_wcs, template_wcs, x, y)
    # Nodes off the template take the PSF at the nearest template position.
    u = np.rint(np.clip(np.nan_to_num(u), 0, template_shape[1] - 1))
    v = np.rint(np.clip(np.nan_to_num(v), 0, template_shape[0] - 1))

    centred = [np.asarray(psf.image_at(float(a), float(b)), np.float64)
               for a, b in zip(u, v, strict=True)]
    k_template = max(k.shape[0] for k in centred)
    half_t = k_template // 2
    identity = ((np.abs(jac - np.eye(2)).max(axis=(1, 2)) <= config.identity_tolerance)
                & (np.abs(phase_u).max(axis=1) < 0.5 / _PHASES)
                & (np.abs(phase_v).max(axis=1) < 0.5 / _PHASES))
    # A science pixel spans sigma_min template pixels at least: enlarge the stamp so that the
    # whole template kernel fits (at most 3x).
    sigma_min = np.linalg.svd(jac, compute_uv=False)[:, -1]
    half = half_t
    if not identity.all() and np.isfinite(sigma_min[~identity]).all():
        shrink = max(float(sigma_min[~identity].min()), 1.0 / 3.0)
        half = max(half_t, int(np.ceil(half_t / shrink - 1e-6)))
    size = 2 * half + 1
    offsets = np.arange(-half, half + 1, dtype=float)
    px, py = (a.ravel() for a in np.meshgrid(offsets, offsets))
    out = np.empty((n_nodes, size, size), np.float32)
    for n in range(n_nodes):
        if identity[n]:
            out[n] = _fit_kernel(centred[n], size) / centred[n].sum()
            continue
        source_u, source_v = u[n] + phase_u[n], v[n] + phase_v[n]
        stamps, ix, iy = psf_stamps(psf, source_u, source_v)
        stamps = _fit_kernel(np.asarray(stamps, np.float64), k_template)
        # Template positions of the science pixels around each source, relative to its stamp's
        # corner pixel (the stamp is centred on pixel (ix, iy)).
        qx = (half_t + source_u - ix)[:, None] + (jac[n, 0, 0] * px + jac[n, 0, 1] * py)[None, :]
        qy = (half_t + source_v - iy)[:, None] + (jac[n, 1, 0] * px + jac[n, 1, 1] * py)[None, :]
        images = _interpolate_stack(stamps, qx, qy, config.kernel, table)  # (samples, size^2)
        totals = images.sum(axis=1, keepdims=True)
        images /= np.where(totals > 0, totals, 1.0)
        out[n] = images.mean(axis=0).reshape(size, size)
    return GridPsf(nodes_x, nodes_y, out.reshape(nodes_y.size, nodes_x.size, size, size))
