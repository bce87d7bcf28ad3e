"""The Alard-Lupton matching kernel: basis, kernel stars and the least-squares fit.

The kernel is a sum of Gaussian x polynomial basis functions (Alard & Lupton 1998) whose
coefficients vary linearly over the image; the first basis function has unit sum and is kept
spatially constant, and the terms even in both x and y are offset by it, so that the kernel sum
(the photometric ratio) may vary over the image through their spatial coefficients. A
polynomial differential background is fitted with it. Kernel stars are clean, unsaturated
sources spread over a grid of cells; stamps that fit badly are clipped.

The fit never builds the full design matrix (stamps x parameters x pixels): every column is a
basis image convolved with the stamp, times a spatial term that is constant over the stamp, so
the normal equations follow from each stamp's small Gram matrix of its convolved basis images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from apqa.datamodel import Exposure
from apqa.datamodel.columns import Columns
from apqa.errors import StageError
from apqa.pipeline.pixels import boxes

_STAMP_FLAGS = ("SAT", "BAD", "CR", "NO_DATA", "INTRP", "EDGE")
#: Injected fakes exist in one image only: a kernel star must not have one in its fit stamp.
_INJECTED = ("INJECTED", "INJECTED_TEMPLATE")


@dataclass
class MatchingKernel:
    """A fitted spatially varying kernel ``K(u, v) = K0 + u K1 + v K2`` and background.

    ``u, v`` run from -1 to 1 across the image (centre 0). ``kernels`` holds K0 (and K1, K2
    when the kernel varies); ``background`` the coefficients of 1, u, v, u^2, uv, v^2 (as
    many as fitted).
    """

    kernels: list[np.ndarray]
    background: np.ndarray
    ix: np.ndarray  # kernel-star pixel positions (all candidates fitted)
    iy: np.ndarray
    used: np.ndarray  # which of them survived the clipping
    condition: float  # of the normal equations, scaled, in the directions solved for
    n_unconstrained: int = 0  # parameter combinations the stars did not constrain (left at 0)

    @property
    def ksum(self) -> float:
        return float(self.kernels[0].sum())

    @property
    def size(self) -> int:
        return int(self.kernels[0].shape[0])

    def at(self, u: float, v: float) -> np.ndarray:
        """The kernel image at image coordinates (u, v) in [-1, 1]."""
        if len(self.kernels) == 1:
            return self.kernels[0]
        return self.kernels[0] + u * self.kernels[1] + v * self.kernels[2]

    def corner_sums(self) -> list[float]:
        """Kernel sums at the four image corners (only the centre's when constant)."""
        if len(self.kernels) == 1:
            return [self.ksum]
        return [self.ksum + su * float(self.kernels[1].sum()) + sv * float(self.kernels[2].sum())
                for su in (-1, 1) for sv in (-1, 1)]


@dataclass(frozen=True)
class KernelBasis:
    """Alard-Lupton basis images and their separable factors.

    Every raw term ``x^i y^j exp(-r^2 / 2 sigma^2)`` is the outer product of two 1-d profiles
    ``t^p exp(-t^2 / 2 sigma^2)``, and every basis image a fixed mixture of raw terms:
    ``images[b] = sum_t mix[b, t] * outer(profiles[ys[t]], profiles[xs[t]])``. Convolving
    stamps with the profiles along each axis and mixing costs a fraction of convolving them
    with every image in two dimensions.
    """

    images: np.ndarray  # (nb, k, k)
    profiles: np.ndarray  # (P, k): the 1-d profiles
    xs: np.ndarray  # (T,): the profile along x of each raw term
    ys: np.ndarray  # (T,): the profile along y
    mix: np.ndarray  # (nb, T)

    @property
    def half(self) -> int:
        return self.images.shape[1] // 2


def gaussian_poly_basis(sigmas: list[float], degrees: tuple[int, ...], half: int
                        ) -> KernelBasis:
    """Alard-Lupton basis: x^i y^j exp(-r^2 / 2 sigma^2) for each sigma and i + j up to its
    degree, scaled to a peak of 1.

    Image 0 sums to 1 (the kernel fit keeps it spatially constant); terms odd in x or y sum
    to 0, and the others are offset by image 0 (see the comment in the code).

    Examples
    --------
    >>> basis = gaussian_poly_basis([1.0, 2.0], (2, 1), 5)
    >>> basis.images.shape, round(float(basis.images[0].sum()), 12)
    ((9, 11, 11), 1.0)
    """
    off = np.arange(-half, half + 1, dtype=np.float64)
    profiles, xs, ys, raw = [], [], [], []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        first = len(profiles)
        profiles += [np.exp(-off**2 / (2 * sigma**2)) * (off / sigma) ** p
                     for p in range(degree + 1)]
        for d in range(degree + 1):
            for j in range(d + 1):
                xs.append(first + d - j)
                ys.append(first + j)
                raw.append(np.outer(profiles[first + j], profiles[first + d - j]))
    # Each image is built with its coefficients over the raw terms alongside. A term with a
    # sum is offset by basis 0 (once per unit of its sum before scaling to a peak of 1), so
    # that its spatial coefficients can move the kernel sum: the photometric ratio may vary
    # over the image, and ``kernel_sum_variation`` reports how much it does.
    unit = np.eye(len(raw))
    images, mix = [raw[0] / raw[0].sum()], [unit[0] / raw[0].sum()]
    for t in range(1, len(raw)):
        total = raw[t].sum()
        scale = np.abs(raw[t]).max()
        b, c = raw[t] / scale, unit[t] / scale
        if abs(total) > 1e-12 * np.abs(b).sum():
            b, c = b / total - images[0], c / total - mix[0]
            scale = np.abs(b).max()
            b, c = b / scale, c / scale
        images.append(b)
        mix.append(c)
    return KernelBasis(np.stack(images), np.stack(profiles), np.array(xs), np.array(ys),
                       np.stack(mix))


def spatial_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Polynomial terms (1; u, v; u^2, uv, v^2) up to ``order``, stacked on the last axis."""
    terms = [np.ones_like(u)]
    if order >= 1:
        terms += [u, v]
    if order >= 2:
        terms += [u * u, u * v, v * v]
    return np.stack(terms, axis=-1)


def select_candidates(candidates: Columns, target: Exposure, other: Exposure,
                      stamp_half: int, fit_half: int, min_snr: float, max_snr: float,
                      cell_size: int, per_cell: int, max_candidates: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Clean candidates spread over the image: up to ``per_cell`` per grid cell, brightest
    first, none whose stamp (half-size ``stamp_half``) touches a flagged pixel in either image
    and none with an injected fake within ``fit_half`` (the stamp the kernel is fitted on)."""
    snr = np.asarray(candidates["snr"], float)
    x, y = np.asarray(candidates["x"], float), np.asarray(candidates["y"], float)
    margin = stamp_half + 2
    ok = ((snr >= min_snr) & (snr < max_snr) & (x > margin) & (y > margin)
          & (x < target.width - 1 - margin) & (y < target.height - 1 - margin))
    ix, iy = np.rint(np.where(ok, x, margin)).astype(int), np.rint(np.where(ok, y, margin)
                                                                  ).astype(int)
    idx = np.nonzero(ok)[0]
    cell = (iy // cell_size) * 100_000 + ix // cell_size

    def top_per_cell(idx: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` brightest of each cell and their rank within it."""
        order = np.lexsort((-snr[idx], cell[idx]))
        sorted_cells = cell[idx][order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_cells))[0] + 1]
        rank = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
        return idx[order][rank < count], rank[rank < count]

    # Only the stamps of the few brightest per cell are looked at, never the full masks.
    idx, _ = top_per_cell(idx, 3 * per_cell)
    for exposure in (target, other):
        for planes, half in ((_STAMP_FLAGS, stamp_half), (_INJECTED, fit_half)):
            bits = exposure.mask.bitmask([p for p in planes if p in exposure.mask.planes])
            if bits:
                clean = ~((boxes(exposure.mask.array, ix[idx], iy[idx], half) & bits) != 0
                          ).any(axis=(1, 2))
                idx = idx[clean]
    keep, rank = top_per_cell(idx, per_cell)
    if keep.size > max_candidates:
        # Spread the cap over the image: the brightest of each cell first, then the next ones.
        keep = keep[np.argsort(rank, kind="stable")[:max_candidates]]
    return ix[keep], iy[keep]


def _convolve_stamps(ref: np.ndarray, basis: KernelBasis, chunk: int = 16) -> np.ndarray:
    """'valid' convolution of each reference stamp (n, m + 2h, m + 2h) with each basis image
    (2h + 1 square): returns (n, nb, m, m).

    Each stamp is convolved along x with every 1-d profile, then along y with the profiles
    each raw term pairs with it, and the raw terms are mixed into the basis images: four
    times faster than two-dimensional FFTs for Rubin's 27 bases, and as exact. ``chunk``
    stamps at a time keep the sliding windows small.
    """
    n, big, _ = ref.shape
    k = basis.profiles.shape[1]
    m = big - k + 1
    flipped = basis.profiles[:, ::-1]  # convolution, not correlation
    pairs = [(p, np.nonzero(basis.xs == p)[0]) for p in range(len(flipped))]
    raw = np.empty((n, m, m, basis.xs.size))
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        along_x = sliding_window_view(ref[part], k, axis=2) @ flipped.T  # (c, big, m, P)
        for p, terms in pairs:
            windows = sliding_window_view(along_x[..., p], k, axis=1)  # (c, m, m, k)
            raw[part][..., terms] = windows @ flipped[basis.ys[terms]].T
    return np.einsum("nyxt,bt->nbyx", raw, basis.mix, optimize=True)


def fit_kernel(target: Exposure, ref: Exposure, ix: np.ndarray, iy: np.ndarray,
               basis: KernelBasis, stamp_half: int, spatial_order: int, background_order: int,
               clip_sigma: float, n_clip: int, min_candidates: int) -> MatchingKernel:
    """Least-squares kernel and background that turn ``ref`` into ``target`` at the stars.

    Solves ``target = K(u, v) * ref + B(u, v)`` over the stamps around (ix, iy), weighted by
    the inverse summed variance, clipping stamps whose chi^2 is an outlier.

    Raises
    ------
    StageError
        When the clipping leaves fewer than ``min_candidates`` stamps.
    """
    half = basis.half
    height, width = target.shape
    cx, cy = (width - 1) / 2, (height - 1) / 2
    data = boxes(target.image, ix, iy, stamp_half).astype(np.float64)
    var = (boxes(target.variance, ix, iy, stamp_half).astype(np.float64)
           + boxes(ref.variance, ix, iy, stamp_half))
    conv = _convolve_stamps(boxes(ref.image, ix, iy, stamp_half + half).astype(np.float64),
                            basis)  # (n, nb, m, m)
    n, nb, m, _ = conv.shape
    weight = (1.0 / np.clip(var, 1e-12, None)).reshape(n, m * m)
    # Each stamp's local basis: the convolved basis images and a constant (the background).
    local = np.concatenate([conv.reshape(n, nb, m * m), np.ones((n, 1, m * m))], axis=1)
    gram = (local * weight[:, None, :]) @ local.transpose(0, 2, 1)  # (n, nb+1, nb+1)
    dvec = data.reshape(n, m * m)
    rhs_local = np.einsum("nap,np,np->na", local, weight, dvec)
    dwd = np.einsum("np,np,np->n", dvec, weight, dvec)
    u = (ix - cx) / (width / 2)
    v = (iy - cy) / (height / 2)
    kterms = spatial_terms(u, v, spatial_order)  # (n, s)
    bterms = spatial_terms(u, v, background_order)  # (n, q)
    ns, nq = kterms.shape[1], bterms.shape[1]
    # Global parameter j = local column lidx[j] times the spatial multiplier factor[:, j]:
    # basis 0 (constant), basis 1.. x spatial terms, background x its terms.
    lidx = np.r_[0, np.repeat(np.arange(1, nb), ns), np.full(nq, nb)]
    factor = np.concatenate([np.ones((n, 1)), np.tile(kterms, (1, nb - 1)), bterms], axis=1)
    gram_g = gram[:, lidx][:, :, lidx]  # (n, p, p)
    used = np.ones(n, bool)
    for _ in range(n_clip + 1):
        f = factor[used]
        normal = np.einsum("nj,nk,njk->jk", f, f, gram_g[used])
        rhs = np.einsum("nj,nj->j", f, rhs_local[used][:, lidx])
        coeffs, condition, n_unconstrained = solve_normal(normal, rhs)
        # Per-stamp local coefficients, then chi^2 = d'Wd - 2 c'r + c'Gc.
        local_c = np.zeros((n, nb + 1))
        np.add.at(local_c.T, lidx, (factor * coeffs).T)
        chi2 = (dwd - 2 * np.einsum("na,na->n", local_c, rhs_local)
                + np.einsum("na,nab,nb->n", local_c, gram, local_c)) / (m * m)
        med = np.median(chi2[used])
        mad = 1.4826 * np.median(np.abs(chi2[used] - med))
        new = chi2 < med + clip_sigma * max(mad, 0.05 * med)
        if np.array_equal(new, used) or new.sum() < min_candidates:
            break
        used = new
    c0 = coeffs[0]
    ck = coeffs[1:1 + (nb - 1) * ns].reshape(nb - 1, ns)
    images = basis.images
    kernels = [c0 * images[0] + np.tensordot(ck[:, 0], images[1:], axes=1)]
    for s in range(1, ns):
        kernels.append(np.tensordot(ck[:, s], images[1:], axes=1))
    return MatchingKernel(kernels, coeffs[1 + (nb - 1) * ns:], ix, iy, used, condition,
                          n_unconstrained)


#: Directions of the scaled normal matrix with eigenvalues below this fraction of the largest
#: are not solved for: the data constrain them to less than 1e-5 of the best-fitted ones.
RCOND = 1e-10


def solve_normal(normal: np.ndarray, rhs: np.ndarray, rcond: float = RCOND
                 ) -> tuple[np.ndarray, float, int]:
    """Least-squares parameters from normal equations, leaving unconstrained directions at 0.

    When science and template have nearly the same seeing the basis Gaussians shrink to a
    fraction of a pixel and their polynomial terms become almost the same images; with few
    stars the spatial terms can lack data too. Such combinations have (numerically) zero
    eigenvalues, where a plain solve returns huge cancelling coefficients. Here the matrix is
    scaled to a unit diagonal, its eigenvectors with eigenvalues under ``rcond`` times the
    largest are dropped (the minimum-norm solution within the rest), and the condition number
    of what was solved is reported.

    Returns
    -------
    coeffs, condition, n_dropped

    Examples
    --------
    >>> normal = np.array([[2.0, 2.0], [2.0, 2.0]])  # two identical basis images
    >>> coeffs, condition, dropped = solve_normal(normal, np.array([4.0, 4.0]))
    >>> np.round(coeffs, 6).tolist(), dropped
    ([1.0, 1.0], 1)
    """
    scale = 1.0 / np.sqrt(np.clip(np.diag(normal), np.finfo(float).tiny, None))
    values, vectors = np.linalg.eigh(normal * scale[:, None] * scale[None, :])
    keep = values > rcond * values[-1]
    kept = vectors[:, keep]
    coeffs = scale * (kept @ ((kept.T @ (scale * rhs)) / values[keep]))
    return coeffs, float(values[keep][-1] / values[keep][0]), int((~keep).sum())


def require_candidates(n_found: int, min_candidates: int, min_snr: float,
                       max_snr: float) -> None:
    """Raise the typed error for too few kernel stars, naming the count found."""
    if n_found < min_candidates:
        raise StageError(f"AL: too few kernel candidates: found {n_found} clean stars with "
                         f"S/N {min_snr:g}-{max_snr:g}, need {min_candidates}")
