"""The point-source fast path: a bank of PSF images on a sub-pixel phase grid, combined with numpy.

The PSF is evaluated at nodes of a regular grid over the image (``spacing`` pixels apart); at
each node the centred kernel is shifted to ``(phases + 1)^2`` sub-pixel phases in [-0.5, 0.5]
(Fourier phase ramps, one batched inverse FFT per node). A point source's stamp interpolates
quadratically (3-point Lagrange per axis) over the 3 x 3 nodes around it, which follows the
PSF's spatial variation, and bilinearly over its 4 surrounding phases: 36 bank images combined
with one batched matrix product per chunk of sources. Every bank image sums to 1 and the weights
sum to 1, so the stamp's flux is exact; the centroid of a blend of shifted images is the blended
shift, so positions are exact too. The bilinear phase blend broadens the PSF by at most
``1 / (4 phases^2)`` px^2 per axis (see :func:`choose_phases` for the resulting PSF-fit bias).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft

from apqa.datamodel import MoffatPsf, PolynomialPsf, Psf
from apqa.datamodel.psf import render_moffat_stamps, shift_kernels

#: Relative level below which a kernel's border counts as empty (no padding needed to shift it).
_EMPTY_BORDER = 1e-7


def node_positions(length: int, spacing: int) -> np.ndarray:
    """Node coordinates from 0 to ``length - 1``, at most ``spacing`` apart (at least 3)."""
    n = max(3, int(np.ceil((length - 1) / spacing)) + 1)
    return np.linspace(0.0, length - 1.0, n)


def centred_kernels(psf: Psf, x: np.ndarray, y: np.ndarray) -> tuple[list, np.ndarray]:
    """Normalized centred PSF kernels at (x, y) and a mask of positions where the PSF failed.

    A failure is an exception from the model, a non-finite pixel or a non-positive sum; its
    kernel is ``None``.
    """
    x = np.atleast_1d(np.asarray(x, np.float64))
    y = np.atleast_1d(np.asarray(y, np.float64))
    try:
        if isinstance(psf, MoffatPsf):
            fwhm, g1, g2 = psf.params_at(x, y)
            raw = list(render_moffat_stamps(np.zeros(x.size), np.zeros(x.size), fwhm, g1, g2,
                                            psf.beta, psf.trunc, psf.stamp_size(), psf.order))
        elif isinstance(psf, PolynomialPsf):
            raw = list(psf.images_at(x, y))
        else:
            raw = [None] * x.size
    except Exception:  # any model error is a per-source PSF failure
        raw = [None] * x.size
    kernels: list = []
    failed = np.zeros(x.size, bool)
    for k in range(x.size):
        kernel = raw[k]
        if kernel is None:
            try:
                kernel = psf.image_at(float(x[k]), float(y[k]))
            except Exception:  # a model that cannot evaluate here
                kernel = None
        kernel = None if kernel is None else np.asarray(kernel, np.float64)
        total = np.nan if kernel is None else kernel.sum()
        if kernel is None or kernel.ndim != 2 or not np.isfinite(kernel).all() or not total > 0:
            failed[k] = True
            kernels.append(None)
        else:
            kernels.append(kernel / total)
    return kernels, failed


def phase_stamps(kernel: np.ndarray, phases: int) -> np.ndarray:
    """``(phases+1, phases+1, K, K)`` images of ``kernel`` shifted by
    ``(-0.5 + i / phases, -0.5 + j / phases)`` px in (y, x), each summing to 1.

    A kernel whose border holds light is padded by one pixel first, so that the shift does not
    wrap it around.
    """
    border = np.concatenate([kernel[0], kernel[-1], kernel[:, 0], kernel[:, -1]])
    if np.abs(border).max() > _EMPTY_BORDER * np.abs(kernel).max():
        kernel = np.pad(kernel, 1)
    size = kernel.shape[0]
    spectrum = sfft.rfft2(kernel.astype(np.float32))
    offsets = -0.5 + np.arange(phases + 1) / phases
    ramp_y = np.exp(-2j * np.pi * offsets[:, None] * np.fft.fftfreq(size)[None, :])
    ramp_x = np.exp(-2j * np.pi * offsets[:, None] * np.fft.rfftfreq(size)[None, :])
    shifted = (spectrum[None, None] * ramp_y[:, None, :, None].astype(np.complex64)
               * ramp_x[None, :, None, :].astype(np.complex64))
    return sfft.irfft2(shifted, s=(size, size), workers=1)


def lagrange3(t: np.ndarray) -> np.ndarray:
    """Weights (N, 3) of nodes at -1, 0, +1 for quadratic interpolation at offsets ``t``."""
    return np.stack([0.5 * t * (t - 1.0), (1.0 - t) * (1.0 + t), 0.5 * t * (t + 1.0)], 1)


def _fit_ratio(model: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """PSF-fit flux of ``model`` images measured with ``truth`` images (1 when equal)."""
    return (model * truth).sum(axis=(1, 2)) / (truth * truth).sum(axis=(1, 2))


def choose_spacing(psf: Psf, shape: tuple[int, int], start: int = 1024, smallest: int = 128,
                   tolerance: float = 2e-4) -> int:
    """Largest node spacing (halving from ``start``) at which the 3 x 3-node interpolation of
    the PSF measures with a PSF-fit flux error below ``tolerance`` between nodes (tested at 16
    offsets around up to 3 x 3 nodes spread over the image)."""
    offsets = np.array([-0.45, -0.2, 0.2, 0.45])
    spacing = start
    while spacing > smallest:
        nodes_x, nodes_y = node_positions(shape[1], spacing), node_positions(shape[0], spacing)
        ci = np.unique(np.linspace(1, nodes_x.size - 2, 3).round().astype(int))
        cj = np.unique(np.linspace(1, nodes_y.size - 2, 3).round().astype(int))
        jj, ii, ty, tx = (a.ravel() for a in np.meshgrid(cj, ci, offsets, offsets,
                                                          indexing="ij"))
        grid = [(dj, di) for dj in (-1, 0, 1) for di in (-1, 0, 1)]
        node_keys = np.unique(np.concatenate([np.stack([jj + dj, ii + di], 1)
                                              for dj, di in grid]), axis=0)
        px = nodes_x[ii] + tx * (nodes_x[1] - nodes_x[0])
        py = nodes_y[jj] + ty * (nodes_y[1] - nodes_y[0])
        kernels, failed = centred_kernels(
            psf, np.concatenate([nodes_x[node_keys[:, 1]], px]),
            np.concatenate([nodes_y[node_keys[:, 0]], py]))
        if failed.any() or len({k.shape for k in kernels}) > 1:
            return spacing  # failures are flagged per source later; no refinement possible
        stack = np.stack(kernels)
        slot = {tuple(k): n for n, k in enumerate(node_keys.tolist())}
        wx, wy = lagrange3(tx), lagrange3(ty)
        blend = np.zeros((px.size, *stack.shape[1:]))
        for dj, di in grid:
            rows = [slot[(j + dj, i + di)] for j, i in zip(jj, ii, strict=True)]
            blend += (wy[:, dj + 1] * wx[:, di + 1])[:, None, None] * stack[rows]
        if np.abs(_fit_ratio(blend, stack[len(node_keys):]) - 1).max() <= tolerance:
            return spacing
        spacing //= 2
    return spacing


def choose_phases(psf: Psf) -> int:
    """Sub-pixel phases per pixel from the PSF FWHM: 8 from 4 px, 12 from 2.5 px, else 16.

    The bilinear phase blend's worst PSF-fit flux bias (Moffat, beta 3.5) is 5e-4 at 8 phases
    and FWHM 4 px, 6e-4 at 12 phases and 2.5 px, 5e-4 at 16 phases and 2 px.
    """
    fwhm = psf.fwhm
    if not np.isfinite(fwhm) or fwhm < 2.5:
        return 16
    return 8 if fwhm >= 4.0 else 12


class PsfBank:
    """Sub-pixel PSF stamps for point sources anywhere on an image (nodes built lazily).

    Parameters
    ----------
    psf
        The exposure's PSF model.
    shape
        (height, width) of the image.
    spacing
        Largest distance between PSF nodes, pixels (default: :func:`choose_spacing`).
    phases
        Sub-pixel steps per pixel (default: :func:`choose_phases`).

    Examples
    --------
    >>> from apqa.datamodel import MoffatPsf
    >>> bank = PsfBank(MoffatPsf(256, 256, fwhm_coeffs=[3.0, 0.1]), (256, 256), 128, 8)
    >>> stamps, ix, iy, failed = bank.stamps(np.array([10.3, 200.7]), np.array([50.0, 9.5]))
    >>> stamps.shape[0], [round(float(s), 5) for s in stamps.sum(axis=(1, 2))], failed.any()
    (2, [1.0, 1.0], np.False_)
    """

    def __init__(self, psf: Psf, shape: tuple[int, int], spacing: int | None = None,
                 phases: int | None = None) -> None:
        self.psf = psf
        self.spacing = spacing or choose_spacing(psf, shape)
        self.phases = phases or choose_phases(psf)
        self.nodes_x = node_positions(shape[1], self.spacing)
        self.nodes_y = node_positions(shape[0], self.spacing)
        # Bank slot of each node: -2 not built yet, -1 PSF failure.
        self._slot = np.full((self.nodes_y.size, self.nodes_x.size), -2, np.int64)
        self._banks: list[np.ndarray] = []
        self._flat: np.ndarray | None = None

    def _build(self, keys: np.ndarray) -> None:
        """Build the nodes ``keys`` ((M, 2) rows of (j, i)) that are not built yet."""
        new = keys[self._slot[keys[:, 0], keys[:, 1]] == -2]
        if not len(new):
            return
        self._flat = None
        kernels, failed = centred_kernels(self.psf, self.nodes_x[new[:, 1]],
                                          self.nodes_y[new[:, 0]])
        for (j, i), kernel, bad in zip(new, kernels, failed, strict=True):
            if bad:
                self._slot[j, i] = -1
                continue
            self._slot[j, i] = len(self._banks)
            self._banks.append(phase_stamps(kernel, self.phases))
        size = max(b.shape[-1] for b in self._banks) if self._banks else 0
        for n, bank in enumerate(self._banks):  # kernels whose size changes: pad to the largest
            pad = (size - bank.shape[-1]) // 2
            if pad:
                self._banks[n] = np.pad(bank, ((0, 0), (0, 0), (pad, pad), (pad, pad)))

    def _flat_bank(self) -> np.ndarray:
        """All built nodes' phase images as one (nodes * phases^2, K * K) array (cached)."""
        if self._flat is None:
            if not self._banks:
                self._flat = np.zeros((1, 1), np.float32)
            else:
                size = self._banks[0].shape[-1]
                self._flat = np.stack(self._banks).reshape(-1, size * size)
        return self._flat

    @staticmethod
    def _nearest(nodes: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest inner node index and the offset from it in node spacings."""
        t = (value - nodes[0]) / (nodes[1] - nodes[0])
        i = np.clip(np.rint(t).astype(np.int64), 1, nodes.size - 2)
        return i, t - i

    def _phase(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = (np.clip(d, -0.5, 0.5) + 0.5) * self.phases
        k = np.clip(np.floor(u).astype(np.int64), 0, self.phases - 1)
        return k, u - k

    def stamps(self, x: np.ndarray, y: np.ndarray, chunk: int = 64
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stamps (N, K, K) summing to 1, their centre pixels (ix, iy) and a PSF-failure mask.

        A source next to a node where the PSF model fails gets the model evaluated at its own
        position instead (shifted like the bank); where that fails too, it is flagged and its
        stamp is zero.
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        n = x.size
        i, tx = self._nearest(self.nodes_x, x)
        j, ty = self._nearest(self.nodes_y, y)
        grid = [(dj, di) for dj in (-1, 0, 1) for di in (-1, 0, 1)]
        needed = np.zeros(self._slot.shape, bool)
        for dj, di in grid:
            needed[j + dj, i + di] = True
        self._build(np.argwhere(needed))
        slots = np.stack([self._slot[j + dj, i + di] for dj, di in grid], 1)  # (N, 9)
        failed = (slots < 0).any(axis=1)
        slots = np.where(slots < 0, 0, slots)
        wx, wy = lagrange3(tx), lagrange3(ty)
        w_node = np.stack([wy[:, dj + 1] * wx[:, di + 1] for dj, di in grid], 1)
        ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        p = self.phases
        px, fx = self._phase(x - ix)
        py, fy = self._phase(y - iy)
        w_phase = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], 1)
        phase_index = np.stack([py * (p + 1) + px, py * (p + 1) + px + 1,
                                (py + 1) * (p + 1) + px, (py + 1) * (p + 1) + px + 1], 1)
        index = (slots[:, :, None] * (p + 1) ** 2 + phase_index[:, None, :]).reshape(n, 36)
        weight = (w_node[:, :, None] * w_phase[:, None, :]).reshape(n, 36).astype(np.float32)
        weight[failed] = 0.0
        flat = self._flat_bank()
        size = math.isqrt(flat.shape[1])
        out = np.empty((n, size * size), np.float32)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            out[sl] = np.matmul(weight[sl, None, :], flat[index[sl]])[:, 0, :]
        out = out.reshape(n, size, size)
        for k in np.flatnonzero(failed):
            kernels, bad = centred_kernels(self.psf, x[k:k + 1], y[k:k + 1])
            if bad[0] or kernels[0].shape[0] > size:
                continue
            pad = (size - kernels[0].shape[0]) // 2
            out[k] = shift_kernels(np.pad(kernels[0], pad)[None], np.array([x[k] - ix[k]]),
                                   np.array([y[k] - iy[k]]))[0]
            failed[k] = False
        return out, ix, iy, failed
