"""Cosmic-ray detection that knows the PSF: a pixel is a cosmic ray when it stands out from its
four neighbours by much more than the sharpest PSF allows.

This is the criterion Rubin's ``findCosmicRays`` uses, applied with vectorized numpy over the
whole image. On the simulator's truth it finds as many cosmic-ray pixels as astroscrappy
(L.A.Cosmic) with fewer false ones, at about a tenth of the time (benchmarks/bench_isr.py).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy.ndimage import label

from apqa.config import ConfigModel
from apqa.pipeline.pixels import boxes


class CosmicRayConfig(ConfigModel):
    """Thresholds of the cosmic-ray finder."""

    min_sigma: float = Field(6.0, gt=0, description="excess over neighbours, in noise sigma")
    sharpness_factor: float = Field(
        1.5, gt=1, description="how much sharper than the sharpest PSF peak a CR pixel must be")
    margin_sigma: float = Field(
        3.0, ge=0, description="extra excess, in noise sigma, beyond the PSF-allowed sharpness")
    n_iterations: int = Field(4, ge=1, description="passes; each finds the next pixels of tracks")
    grow_sigma: float = Field(3.0, gt=0, description="neighbours above this join a cosmic ray")


def psf_peak_contrast(fwhm: float) -> float:
    """(peak - mean of the 4 neighbours) / peak of a pixel-integrated Gaussian of this FWHM.

    The centred phase is the sharpest, so this bounds what a star can show.
    """
    sigma = max(fwhm, 0.5) / 2.3548
    # Pixel-integrated 1-d Gaussian at offsets 0 and 1, via the error function.
    from scipy.special import erf

    def pix(c: float) -> float:
        return 0.5 * (erf((c + 0.5) / (np.sqrt(2) * sigma)) - erf((c - 0.5) / (np.sqrt(2) * sigma)))

    p0, p1 = pix(0.0), pix(1.0)
    return float((p0 * p0 - p0 * p1) / (p0 * p0))


#: Peak contrasts above this are taken for cosmic rays or hot pixels, not stars (a centred
#: pixel-integrated Gaussian reaches it only at a FWHM under 1.1 px).
MAX_STAR_CONTRAST = 0.8


def sharpest_star_contrast(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """The sharpest peak contrast, (peak - mean of its 4 neighbours) / peak, among sources:
    the second sharpest when two or more qualify, since a cosmic ray on one star's core must
    not loosen the bound for the whole image (on a 2k x 4k CCD with a thousand hits, about one
    lands on a bright star's core).

    Give bright sources (S/N >~ 50: noise barely moves their contrast). Each source's peak is
    the brightest pixel within one pixel of its rounded centroid. Contrasts above
    :data:`MAX_STAR_CONTRAST` are left out. Returns 0 when no source qualifies.

    A PSF with a sharp core on broad wings (JWST, HST) is far peakier than its second
    moments say; the cores of its stars set the bound that cosmic rays must exceed.
    """
    ix = np.rint(np.asarray(x, float)).astype(int)
    iy = np.rint(np.asarray(y, float)).astype(int)
    if ix.size == 0:
        return 0.0
    stamps = boxes(image, ix, iy, 2).astype(np.float64)  # (n, 5, 5)
    n = np.arange(ix.size)
    brightest = stamps[:, 1:4, 1:4].reshape(ix.size, 9).argmax(axis=1)
    py, px = brightest // 3 + 1, brightest % 3 + 1
    peak = stamps[n, py, px]
    around = 0.25 * (stamps[n, py - 1, px] + stamps[n, py + 1, px] + stamps[n, py, px - 1]
                     + stamps[n, py, px + 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        contrast = (peak - around) / peak
    ok = np.isfinite(contrast) & (peak > 0) & (contrast <= MAX_STAR_CONTRAST)
    ranked = np.sort(contrast[ok])[::-1]
    return float(ranked[min(1, ranked.size - 1)]) if ranked.size else 0.0


def _rows_excess(work: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``work`` minus the mean of each pixel's four neighbours (the image's
    edges repeated)."""
    height = work.shape[0]
    rows = work[r0:r1]
    above = work[r0 - 1:r1 - 1] if r0 > 0 else np.concatenate([work[:1], work[:r1 - 1]])
    below = work[r0 + 1:r1 + 1] if r1 < height else np.concatenate([work[r0 + 1:], work[-1:]])
    out = above + below
    out[:, 1:-1] += rows[:, :-2] + rows[:, 2:]
    out[:, 0] += rows[:, 0] + rows[:, 1]
    out[:, -1] += rows[:, -2] + rows[:, -1]
    out *= np.float32(-0.25)
    out += rows
    return out


def _pixels_above(work: np.ndarray, threshold: float, block: int = 256
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels whose excess over their neighbours exceeds ``threshold``, found
    in blocks of rows: no image-sized temporary."""
    found = []
    for r0 in range(0, work.shape[0], block):
        ys, xs = np.nonzero(_rows_excess(work, r0, min(r0 + block, work.shape[0])) > threshold)
        found.append((ys + r0, xs))
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _excess(work: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``work`` minus the mean of its four neighbours (edges repeated) at the pixels (ys, xs)."""
    height, width = work.shape
    up, down = np.maximum(ys - 1, 0), np.minimum(ys + 1, height - 1)
    left, right = np.maximum(xs - 1, 0), np.minimum(xs + 1, width - 1)
    return work[ys, xs] - np.float32(0.25) * (work[up, xs] + work[down, xs] + work[ys, left]
                                              + work[ys, right])


#: Offsets within Manhattan distance 2: the reach of two 4-connected dilations.
_DIAMOND = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if abs(dy) + abs(dx) <= 2]
_CROSS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _neighbours(ys: np.ndarray, xs: np.ndarray, offsets, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Unique in-image pixels at ``offsets`` from the pixels (ys, xs)."""
    height, width = shape
    ny = np.concatenate([ys + dy for dy, _ in offsets])
    nx = np.concatenate([xs + dx for _, dx in offsets])
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    flat = np.unique(ny[inside].astype(np.int64) * width + nx[inside])
    return flat // width, flat % width


def _near_excluded(excluded: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """For each pixel: is an excluded pixel within Manhattan distance 2?"""
    height, width = excluded.shape
    near = np.zeros(ys.shape, bool)
    for dy, dx in _DIAMOND:
        near |= excluded[np.clip(ys + dy, 0, height - 1), np.clip(xs + dx, 0, width - 1)] & (
            (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width))
    return near


def detect_cosmic_rays(image: np.ndarray, variance: np.ndarray, background: np.ndarray | float,
                       excluded: np.ndarray, psf_fwhm: float,
                       config: CosmicRayConfig | None = None,
                       star_contrast: float = 0.0) -> np.ndarray:
    """Boolean map of cosmic-ray pixels.

    Parameters
    ----------
    image, variance
        Bias-subtracted, flat-fielded pixels and their variance.
    background
        Sky level (scalar or map) to measure a pixel's signal from.
    excluded
        Pixels never called cosmic rays (saturated, bad, no data).
    psf_fwhm
        PSF FWHM in pixels: sharper features than this PSF allows are cosmic rays. The bound is
        computed for a Gaussian of 0.85 times this FWHM, because real (Moffat, Kolmogorov) cores
        are peakier than a Gaussian of the same width.
    star_contrast
        The sharpest peak contrast measured on the image's stars
        (:func:`sharpest_star_contrast`), when the PSF's core is peakier still.
    """
    config = config or CosmicRayConfig()
    contrast = max(psf_peak_contrast(0.85 * psf_fwhm), star_contrast)
    limit = np.float32(min(config.sharpness_factor * contrast, 0.95))
    floor = np.broadcast_to(np.asarray(background, np.float32), image.shape)
    # The pixels as the passes see them: found cosmic rays are filled in a copy (made once
    # there are some). Excluded pixels need no filling: their neighbours are never judged.
    work = np.asarray(image, np.float32)

    def judged(ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pixels among (ys, xs) sharper than the sharpest PSF peak by a significant
        margin (noise can sharpen a star), and not next to saturated or bad pixels (those see
        a filled-in neighbour)."""
        excess = _excess(work, ys, xs)
        noise = np.sqrt(np.clip(variance[ys, xs], 0, None) * np.float32(1.25))
        ok = (excess > config.min_sigma * noise) & (
            excess > limit * (work[ys, xs] - floor[ys, xs]) + config.margin_sigma * noise)
        ys, xs = ys[ok], xs[ok]
        ok = ~_near_excluded(excluded, ys, xs)
        return ys[ok], xs[ok]

    # The first pass looks at every pixel through a cheap necessary condition (an excess of
    # min_sigma times the smallest noise); only the few pixels that pass are judged fully.
    # Any lower bound of the noise will do; the smallest variance of all pixels is one unless
    # it is not positive (then look only at the usable pixels).
    smallest = float(np.min(variance))
    if not smallest > 0:
        smallest = float(np.min(variance[~excluded & np.isfinite(variance)], initial=0.0))
    min_noise = float(np.sqrt(max(smallest, 0.0) * 1.25))
    ys, xs = judged(*_pixels_above(work, config.min_sigma * min_noise))
    if ys.size and config.n_iterations > 1:
        work = work.copy() if work is image else work
    crs = np.zeros(image.shape, bool)
    # The pixels found so far, as coordinates: a full-image np.nonzero per pass cost more
    # than the rest of the pass.
    cy, cx = np.zeros(0, np.intp), np.zeros(0, np.intp)
    for _ in range(config.n_iterations - 1):
        if ys.size == 0:
            break
        crs[ys, xs] = True
        cy, cx = np.concatenate([cy, ys]), np.concatenate([cx, xs])
        # Fill the pixels found so far, so the next pass sees the rest of each track; only
        # the four neighbours of filled pixels change their excess.
        fill_from_neighbours(image, crs | excluded, work, cy, cx)
        ny, nx = _neighbours(cy, cx, _CROSS, image.shape)
        fresh = ~crs[ny, nx] & ~excluded[ny, nx]
        # Two found pixels can share a neighbour: judge (and record) each pixel once.
        ys, xs = np.unravel_index(np.unique(np.ravel_multi_index(
            (ny[fresh], nx[fresh]), image.shape)), image.shape)
        ys, xs = judged(ys, xs)
    crs[ys, xs] = True
    cy, cx = np.concatenate([cy, ys]), np.concatenate([cx, xs])
    if cy.size:
        # 4-neighbours of cosmic-ray pixels that are clearly above the sky join them.
        ny, nx = _neighbours(cy, cx, _CROSS, image.shape)
        grow = ~crs[ny, nx] & ~excluded[ny, nx] & (
            image[ny, nx] - floor[ny, nx] > config.grow_sigma * np.sqrt(variance[ny, nx]))
        crs[ny[grow], nx[grow]] = True
    return crs


def fill_from_neighbours(image: np.ndarray, masked: np.ndarray,
                         work: np.ndarray | None = None, ys: np.ndarray | None = None,
                         xs: np.ndarray | None = None) -> np.ndarray:
    """Masked pixels replaced by the mean of the unmasked pixels in a 5x5 (then 17x17) box.

    Only the masked pixels are visited (gathered windows), so the cost follows their number.
    A cheap fill for detection purposes; :func:`~apqa.pipeline.interpolate.interpolate_masked`
    makes the science-grade interpolation. ``work`` (default: a copy of ``image``) is updated
    in place and returned. ``ys, xs`` limit the filling to those masked pixels.
    """
    out = image.astype(np.float32, copy=True) if work is None else work
    if ys is None or xs is None:
        ys, xs = np.nonzero(masked)
    for half in (2, 8):
        if ys.size == 0:
            break
        good = ~boxes(masked, xs, ys, half)
        total = np.where(good, boxes(image, xs, ys, half), 0).sum(axis=(1, 2))
        count = good.sum(axis=(1, 2))
        ok = count > 0
        out[ys[ok], xs[ok]] = total[ok] / count[ok]
        ys, xs = ys[~ok], xs[~ok]
    out[ys, xs] = 0.0
    return out


def count_cosmic_rays(crs: np.ndarray) -> int:
    """Number of connected cosmic-ray groups (8-connectivity)."""
    return int(label(crs, structure=np.ones((3, 3)))[1])
