"""ZOGY's FFT grids and tiling: zero-padded buffers, the filtering of one region into D, S and
their variances, and the overlapping tiles that follow spatially varying PSFs.

Split from :mod:`apqa.pipeline.diffim.zogy`, which holds the public API and the main flow.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft as sfft

from apqa.allocator import written_zeros
from apqa.pipeline.diffim.zogy_kernels import _Kernels, _zogy_kernels
from apqa.pipeline.diffim.zogy_noise import _astrometric_variance
from apqa.pipeline.fftconv import centred_kernel_spectrum
from apqa.pipeline.threads import core_budget

if TYPE_CHECKING:
    from apqa.pipeline.diffim.zogy_types import ZogyConfig

#: Half-width (pixels) of the blending ramps between tiles.
_TILE_BLEND = 32
#: Most tiles filtered at once, each in a thread of its own.
_TILE_THREADS = 2


def _padded_shape(shape: tuple[int, int], pad: int) -> tuple[int, int]:
    """FFT grid: the image plus ``pad`` zero pixels along each axis, rounded to a fast length
    (pocketfft's factors 2, 3, 5, 7 and 11; ``real=True`` would allow only 2, 3 and 5 and pad
    4096 + 41 to 4320 instead of 4158).

    Circular convolution with a kernel of half-width h wraps pixels no further than h, so with
    ``pad >= h`` the zeros, not the opposite edge of the image, are what wraps onto the image.
    """
    return sfft.next_fast_len(shape[0] + pad), sfft.next_fast_len(shape[1] + pad)


def _padded_copy(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``values`` in the corner of a zero buffer of ``shape`` (an FFT grid)."""
    buf = np.zeros(shape, np.float32)
    buf[:values.shape[0], :values.shape[1]] = values
    return buf


def _padded_variance(variance: np.ndarray, weights: np.ndarray, bad: np.ndarray,
                     shape: tuple[int, int]) -> np.ndarray:
    """``variance * weights**2`` (0 on bad pixels) in a zero-padded FFT buffer of ``shape``.

    Built region by region where it is needed, rather than as a weighted copy of the whole
    variance plane: two image-sized planes fewer at ZOGY's peak, which on these machines
    is memory faulted in afresh (~0.1 s).
    """
    buf = np.zeros(shape, np.float32)
    view = buf[:variance.shape[0], :variance.shape[1]]
    with np.errstate(invalid="ignore"):  # inf * 0 on bad pixels, zeroed just after
        np.multiply(variance, weights, out=view)
        view *= weights
    np.copyto(view, np.float32(0), where=bad)
    return buf


def _padded_product(values: np.ndarray, weights: np.ndarray, bad: np.ndarray,
                    pshape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``values * weights`` (0 on bad pixels) in a zero-padded FFT buffer of ``pshape``.

    Returns (view of the image part, whole buffer); building the product in place saves the
    copy that ``rfft2(..., s=pshape)`` would make.
    """
    buf = np.zeros(pshape, np.float32)
    view = buf[:values.shape[0], :values.shape[1]]
    np.multiply(values, weights, out=view)
    np.copyto(view, np.float32(0), where=bad)  # after the product: NaN * 0 stays NaN
    return view, buf


@dataclass
class _Tile:
    """The kernels of one tile and the largest PSF re-centring applied for them."""

    kernels: _Kernels
    shift: float


def _filter_region(buf_n: np.ndarray, buf_r: np.ndarray, buf_vn: np.ndarray, buf_vr: np.ndarray,
                   kernels: _Kernels, out_shape: tuple[int, int],
                   astrometric_sigma: tuple[float, float], workers: int,
                   n_hat: np.ndarray | None = None, r_hat: np.ndarray | None = None,
                   with_score: bool = True
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """D, S (not yet normalized), var(D) and var(S) of one region (S and var(S) None
    without ``with_score``: a third fewer transforms).

    ``buf_*`` are the region's (weighted) images and variances, zero-padded to the FFT grid;
    they are overwritten. ``D = k_dn (x) N - k_dr (x) R``, ``S = D (x) P_D(-x)``, and the
    variances are the variance planes through the squared kernels.
    """
    fshape = buf_n.shape
    height, width = out_shape

    def spectrum(kernel: np.ndarray) -> np.ndarray:
        return centred_kernel_spectrum(kernel, fshape, workers)

    def crop(spec: np.ndarray, overwrite: bool = True) -> np.ndarray:
        return sfft.irfft2(spec, s=fshape, workers=workers,
                           overwrite_x=overwrite)[:height, :width]

    def filtered(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Transform of sum(kernel (x) image) over (kernel, image transform) pairs."""
        total = spectrum(pairs[0][0])
        total *= pairs[0][1]
        for kernel, image_hat in pairs[1:]:
            term = spectrum(kernel)
            term *= image_hat
            total += term
        return total

    if n_hat is None:
        n_hat = sfft.rfft2(buf_n, workers=workers, overwrite_x=True)
    if r_hat is None:
        r_hat = sfft.rfft2(buf_r, workers=workers, overwrite_x=True)
    d_hat = filtered([(kernels.d_science, n_hat), (-kernels.d_template, r_hat)])
    diff = crop(d_hat, overwrite=not with_score)  # d_hat is needed again for the score
    score = None
    if with_score:
        pd_hat = spectrum(kernels.psf_d)
        np.conjugate(pd_hat, out=pd_hat)
        d_hat *= pd_hat
        del pd_hat
        score = crop(d_hat)
    del d_hat
    vn_hat = sfft.rfft2(buf_vn, workers=workers, overwrite_x=True)
    vr_hat = sfft.rfft2(buf_vr, workers=workers, overwrite_x=True)
    var_d = crop(filtered([(kernels.d_science**2, vn_hat), (kernels.d_template**2, vr_hat)]))
    if not with_score:
        return diff, None, var_d, None
    assert kernels.s_science is not None and kernels.s_template is not None
    var_s = crop(filtered([(kernels.s_science**2, vn_hat), (kernels.s_template**2, vr_hat)]))
    del vn_hat, vr_hat
    sigma_ast_n, sigma_ast_r = astrometric_sigma
    if sigma_ast_n > 0 or sigma_ast_r > 0:
        var_s += _astrometric_variance(n_hat, r_hat, spectrum(kernels.s_science),
                                       spectrum(kernels.s_template), sigma_ast_n, sigma_ast_r,
                                       fshape, out_shape, workers)
    return diff, score, var_d, var_s


def _cell_bounds(n: int, tile_size: int | None) -> np.ndarray:
    """Boundaries of the tiles along one axis: about ``tile_size`` pixels each."""
    count = 1 if tile_size is None else max(1, round(n / tile_size))
    return np.round(np.linspace(0, n, count + 1)).astype(int)


def _tile_length(start: int, stop: int, n: int, pad: int) -> int:
    """FFT length of a tile's region ``[start, stop)`` along an axis of ``n`` pixels.

    Zero padding is needed only where the region reaches a real edge of the image, whose
    output is kept up to the edge. A side inside the image is ``blend + radius`` pixels past
    any pixel kept, and the kernels reach only ``radius``: what circular convolution wraps
    there lands on pixels that are discarded. On 1024-pixel tiles with a 128-pixel kernel
    radius the inner tiles' transforms are a sixth smaller.
    """
    at_edge = start == 0 or stop == n
    return sfft.next_fast_len(stop - start + (pad if at_edge else 0))


def _partition(n: int, bounds: np.ndarray, blend: int) -> list[np.ndarray]:
    """1-d weights of the cells between ``bounds``, summing to 1 at every pixel.

    Each inner boundary is crossed by a raised-cosine ramp ``2 blend`` pixels wide, so
    neighbouring tiles' results (from slightly different PSFs) fade into each other without
    a seam.
    """
    centres = np.arange(n) + 0.5  # pixel i covers [i, i + 1); boundary b lies before pixel b

    def step(b: int) -> np.ndarray:
        t = np.clip((centres - (b - blend)) / (2 * blend), 0.0, 1.0)
        return 0.5 - 0.5 * np.cos(np.pi * t)

    weights = []
    for i in range(len(bounds) - 1):
        w = np.ones(n)
        if i > 0:
            w *= step(bounds[i])
        if i < len(bounds) - 2:
            w *= 1.0 - step(bounds[i + 1])
        weights.append(w.astype(np.float32))
    return weights


def _filter_tiles(img_n: np.ndarray, img_r: np.ndarray, var_n: np.ndarray,
                  var_r: np.ndarray, weights: np.ndarray, bad: np.ndarray,
                  cell_psfs: list[tuple[np.ndarray, np.ndarray, float]],
                  cells_y: np.ndarray, cells_x: np.ndarray, kernel_args: tuple, psf_size: int,
                  pad: int, config: ZogyConfig, with_score: bool = True
                  ) -> tuple[list[_Tile], tuple[np.ndarray, np.ndarray | None, np.ndarray,
                                                np.ndarray | None]]:
    """Tiled ZOGY: each tile with the PSFs at its centre, results blended across overlaps.

    A tile's region extends past its cell by the blending half-width plus the kernel radius,
    so every pixel kept is computed from complete data (the kernels are exactly that wide);
    only real image edges see the zero padding. Variances are blended with the same weights
    (neighbouring tiles' kernels are nearly identical, so their noise is nearly the same).
    ``img_*`` are the tapered images (0 on bad pixels); ``var_*`` the inputs' variance planes,
    which each tile weights with ``weights**2`` for its own region.
    """
    height, width = img_n.shape
    radius = kernel_args[4]
    blend = _TILE_BLEND
    wy = _partition(height, cells_y, blend)
    wx = _partition(width, cells_x, blend)
    # D, S, var(D), var(S): the score's two only when asked for.
    wanted = (True, with_score, True, with_score)
    outputs = tuple(written_zeros((height, width), np.float32) if w else None for w in wanted)
    cells = [(j, i) for j in range(len(cells_y) - 1) for i in range(len(cells_x) - 1)]

    def one_tile(cell: tuple[int, int]) -> tuple[_Tile, tuple[slice, slice], tuple]:
        j, i = cell
        y0 = max(0, cells_y[j] - blend - radius)
        y1 = min(height, cells_y[j + 1] + blend + radius)
        x0 = max(0, cells_x[i] - blend - radius)
        x1 = min(width, cells_x[i + 1] + blend + radius)
        pn, pr, shift = cell_psfs[j * (len(cells_x) - 1) + i]
        kernels = _zogy_kernels(pn, pr, *kernel_args, psf_size, with_score)
        region = (slice(y0, y1), slice(x0, x1))
        fshape = (_tile_length(y0, y1, height, pad), _tile_length(x0, x1, width, pad))
        bufs = [_padded_copy(values[region], fshape) for values in (img_n, img_r)]
        bufs += [_padded_variance(var[region], weights[region], bad[region], fshape)
                 for var in (var_n, var_r)]
        parts = _filter_region(*bufs, kernels, (y1 - y0, x1 - x0), config.astrometric_sigma,
                               fft_workers, with_score=with_score)
        # Only the cell and its blending zone have weight: the kernel-radius margins none.
        ky0, ky1 = max(0, cells_y[j] - blend), min(height, cells_y[j + 1] + blend)
        kx0, kx1 = max(0, cells_x[i] - blend), min(width, cells_x[i + 1] + blend)
        weight = wy[j][ky0:ky1, None] * wx[i][None, kx0:kx1]
        kept = (slice(ky0 - y0, ky1 - y0), slice(kx0 - x0, kx1 - x0))
        pieces = tuple(None if part is None else part[kept] for part in parts)
        for piece in pieces:
            if piece is not None:
                piece *= weight
        return _Tile(kernels, shift), (slice(ky0, ky1), slice(kx0, kx1)), pieces

    # The core budget goes to tiles in threads first: the products and copies between
    # transforms are single-threaded otherwise.
    budget = core_budget(config.workers)
    threads = max(1, min(_TILE_THREADS, budget))
    fft_workers = max(1, budget // threads)
    tiles = []
    # The threads work through the tiles while this one adds up the finished ones, in tile
    # order so that the result does not depend on which thread finishes first (a blending
    # corner sums four tiles). Waiting for each pair of tiles instead left both cores idle
    # for ~0.02 s per pair.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for tile, window, pieces in pool.map(one_tile, cells):
            tiles.append(tile)
            for total, piece in zip(outputs, pieces, strict=True):
                if piece is not None:
                    total[window] += piece
    return tiles, outputs
