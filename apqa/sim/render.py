"""Drawing the simulated scene into pixel arrays (electrons).

Point sources are rendered exactly with the truth PSF at their own position (vectorized
Gauss-Legendre pixel integration, see :func:`apqa.datamodel.psf.render_moffat_stamps`).
Galaxies are drawn with GalSim without the PSF into a layer that is then convolved tile by tile
with the truth PSF at each tile's centre (overlap-add, so flux is conserved exactly); drawing each
galaxy convolved with its own PSF through FFTs would cost ~2 ms per galaxy.
"""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
from astropy.wcs import WCS

from apqa.datamodel.psf import MoffatPsf, convolve_full, render_moffat_stamps

_CHUNK = 64


def add_stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, stamps: np.ndarray) -> None:
    """Add ``stamps`` (N, S, S) centred on integer pixels (ix, iy) into ``image``, clipped."""
    h = stamps.shape[1] // 2
    height, width = image.shape
    for k in range(len(ix)):
        x0, y0 = ix[k] - h, iy[k] - h
        x1, y1 = x0 + stamps.shape[2], y0 + stamps.shape[1]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        image[cy0:cy1, cx0:cx1] += stamps[k, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def add_point_sources(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                      psf: MoffatPsf) -> None:
    """Add point sources of total ``flux`` (image units) at pixel positions (x, y)."""
    x, y, flux = (np.asarray(a, np.float64) for a in (x, y, flux))
    if x.size == 0:
        return
    size = psf.stamp_size()
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    fwhm, g1, g2 = psf.params_at(x, y)
    for start in range(0, x.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        stamps = render_moffat_stamps(
            x[sl] - ix[sl], y[sl] - iy[sl], fwhm[sl], g1[sl], g2[sl],
            psf.beta, psf.trunc, size, psf.order,
        )
        stamps *= flux[sl, None, None].astype(np.float32)
        add_stamps(image, ix[sl], iy[sl], stamps)


def trail_points(x: np.ndarray, y: np.ndarray, length: np.ndarray, angle_deg: np.ndarray,
                 flux: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split trails (centre x, y; length px; angle from +x) into point sources 0.25 px apart."""
    xs, ys, fs = [], [], []
    for xc, yc, ln, ang, f in zip(x, y, length, angle_deg, flux, strict=True):
        n = max(1, int(np.ceil(ln / 0.25)) + 1)
        t = np.linspace(-0.5, 0.5, n) * ln if n > 1 else np.zeros(1)
        xs.append(xc + t * np.cos(np.deg2rad(ang)))
        ys.append(yc + t * np.sin(np.deg2rad(ang)))
        fs.append(np.full(n, f / n))
    if not xs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(fs)


def local_jacobians(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 2, 2) local Jacobians d(u, v)/d(x, y) in arcsec per pixel (+u west, +v north)."""
    xs = np.concatenate([x, x + 0.5, x - 0.5, x, x])
    ys = np.concatenate([y, y, y, y + 0.5, y - 0.5])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    n = x.size
    cosd = np.cos(np.deg2rad(dec[:n]))

    def uv(i: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(i * n, (i + 1) * n)
        dra = (ra[sl] - ra[:n] + 180.0) % 360.0 - 180.0
        return -dra * cosd * 3600.0, (dec[sl] - dec[:n]) * 3600.0

    (u_px, v_px), (u_mx, v_mx) = uv(1), uv(2)
    (u_py, v_py), (u_my, v_my) = uv(3), uv(4)
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0], jac[:, 1, 0] = u_px - u_mx, v_px - v_mx
    jac[:, 0, 1], jac[:, 1, 1] = u_py - u_my, v_py - v_my
    return jac


def galaxy_layer(shape: tuple[int, int], galaxies: pd.DataFrame, jac: np.ndarray,
                 oversample: int = 2) -> np.ndarray:
    """Intrinsic (not PSF-convolved) Sersic galaxies drawn with GalSim, in image units.

    ``galaxies`` needs x, y, flux, sersic_n, half_light_radius (arcsec), q, beta (degrees).
    Each stamp is drawn on an ``oversample``-times finer grid, binned, and normalized to its
    flux, so flux is exact even for cuspy profiles smaller than a pixel.
    """
    layer = np.zeros(shape, np.float32)
    if len(galaxies) == 0:
        return layer
    x = galaxies["x"].to_numpy()
    y = galaxies["y"].to_numpy()
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    scale = np.sqrt(np.abs(np.linalg.det(jac)))
    hlr_px = galaxies["half_light_radius"].to_numpy() / scale
    q = galaxies["q"].to_numpy()
    half = np.clip(np.ceil(4.0 * hlr_px / np.sqrt(q)), 2, 60).astype(int)
    # Plain arrays: pandas item access in this loop would cost more than the drawing.
    sersic_n = galaxies["sersic_n"].to_numpy(float)
    hlr = galaxies["half_light_radius"].to_numpy(float)
    beta = galaxies["beta"].to_numpy(float)
    flux = galaxies["flux"].to_numpy(float)
    for k in range(len(galaxies)):
        size = 2 * int(half[k]) + 1
        profile = galsim.Sersic(n=sersic_n[k], half_light_radius=hlr[k]).shear(
            q=q[k], beta=beta[k] * galsim.degrees)
        j = jac[k] / oversample
        wcs = galsim.JacobianWCS(j[0, 0], j[0, 1], j[1, 0], j[1, 1])
        fine = profile.drawImage(
            nx=size * oversample, ny=size * oversample, wcs=wcs, method="no_pixel",
            offset=((x[k] - ix[k]) * oversample, (y[k] - iy[k]) * oversample),
        ).array
        stamp = fine.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
        total = stamp.sum()
        if total <= 0:
            continue
        stamp *= flux[k] / total
        add_stamps(layer, ix[k:k + 1], iy[k:k + 1], stamp[None].astype(np.float32))
    return layer


def convolve_tiles(layer: np.ndarray, psf: MoffatPsf, tile: int = 512) -> np.ndarray:
    """Convolve ``layer`` with the PSF at each tile's centre (overlap-add; flux-conserving)."""
    out = np.zeros_like(layer)
    height, width = layer.shape
    size = psf.stamp_size()
    h = size // 2
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            block = layer[y0:y1, x0:x1]
            if not block.any():
                continue
            kernel = psf.image_at((x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, size)
            conv = convolve_full(block, kernel)
            oy0, ox0 = y0 - h, x0 - h
            cy0, cx0 = max(oy0, 0), max(ox0, 0)
            cy1, cx1 = min(oy0 + conv.shape[0], height), min(ox0 + conv.shape[1], width)
            out[cy0:cy1, cx0:cx1] += conv[cy0 - oy0:cy1 - oy0, cx0 - ox0:cx1 - ox0]
    return out


def cosmic_rays(shape: tuple[int, int], n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Cosmic-ray hits: sharp tracks of deposited charge (electrons), not seen through the PSF.

    Returns one row per affected pixel: ``cr_id``, ``x``, ``y``, ``charge_e``.
    """
    height, width = shape
    rows = []
    for cr in range(n):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        length = rng.exponential(2.0) if rng.random() < 0.7 else rng.uniform(5, 40)
        angle = rng.uniform(0, np.pi)
        t = np.arange(0, length + 0.3, 0.3)
        px = np.rint(x0 + t * np.cos(angle)).astype(np.int64)
        py = np.rint(y0 + t * np.sin(angle)).astype(np.int64)
        keep = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        pix = np.unique(np.stack([px[keep], py[keep]], axis=1), axis=0)
        if pix.size == 0:
            continue
        charge = rng.lognormal(np.log(1500.0), 0.5, len(pix))
        rows.append(pd.DataFrame({"cr_id": cr, "x": pix[:, 0], "y": pix[:, 1],
                                  "charge_e": charge}))
        # Charge diffusion into a neighbour for some pixels of the track.
        spill = rng.random(len(pix)) < 0.3
        if spill.any():
            d = np.array([(1, 0), (-1, 0), (0, 1), (0, -1)])[rng.integers(0, 4, spill.sum())]
            sx, sy = pix[spill, 0] + d[:, 0], pix[spill, 1] + d[:, 1]
            ok = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
            rows.append(pd.DataFrame({"cr_id": cr, "x": sx[ok], "y": sy[ok],
                                      "charge_e": 0.2 * charge[spill][ok]}))
    if not rows:
        return pd.DataFrame({"cr_id": [], "x": [], "y": [], "charge_e": []})
    return pd.concat(rows, ignore_index=True).groupby(["cr_id", "x", "y"], as_index=False).sum()


def streak_image(shape: tuple[int, int], x0: float, y0: float, angle_deg: float,
                 sigma_px: float, e_per_px_length: float) -> tuple[np.ndarray, np.ndarray]:
    """A satellite streak through (x0, y0): Gaussian cross-section, uniform along the line.

    Returns the boolean map of pixels within 5 sigma of the line and the streak's electrons.
    """
    height, width = shape
    nx, ny = -np.sin(np.deg2rad(angle_deg)), np.cos(np.deg2rad(angle_deg))
    dist = ((np.arange(width, dtype=np.float32) - np.float32(x0)) * np.float32(nx))[None, :] \
        + ((np.arange(height, dtype=np.float32) - np.float32(y0)) * np.float32(ny))[:, None]
    near = np.abs(dist) < 5 * sigma_px
    values = np.zeros(shape, np.float32)
    values[near] = (e_per_px_length / (np.sqrt(2 * np.pi) * sigma_px)
                    * np.exp(-0.5 * (dist[near] / sigma_px) ** 2))
    return near, values


def bleed(electrons: np.ndarray, full_well: float) -> np.ndarray:
    """Cap pixels at ``full_well`` and spill the excess charge up and down the column.

    Returns the boolean map of pixels at full well or holding spilled charge (saturated cores
    and bleed trails, including each trail's partly filled last pixel).
    """
    over = electrons > full_well
    affected = over.copy()
    if not over.any():
        return affected
    height = electrons.shape[0]
    for col in np.unique(np.nonzero(over)[1]):
        column = electrons[:, col]
        rows = np.nonzero(column > full_well)[0]
        # Group contiguous saturated runs and treat each run separately.
        breaks = np.nonzero(np.diff(rows) > 1)[0]
        for run in np.split(rows, breaks + 1):
            excess = float(np.sum(column[run] - full_well))
            column[run] = full_well
            lo, hi = run[0] - 1, run[-1] + 1
            for direction in (-1, 1):
                share = excess / 2
                i = lo if direction < 0 else hi
                while share > 0 and 0 <= i < height:
                    room = full_well - column[i]
                    if room > 0:
                        take = min(room, share)
                        column[i] += take
                        share -= take
                        affected[i, col] = True
                    i += direction
        electrons[:, col] = column
    return affected | (electrons >= full_well)


def add_noise(expected: np.ndarray, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson photon noise (Gaussian where the mean exceeds 50 e-) plus Gaussian read noise."""
    noisy = expected + np.sqrt(np.clip(expected, 0, None)) * rng.standard_normal(
        expected.shape, dtype=np.float32)
    low = expected < 50
    if low.any():
        noisy[low] = rng.poisson(np.clip(expected[low], 0, None)).astype(np.float32)
    noisy += np.float32(read_noise) * rng.standard_normal(expected.shape, dtype=np.float32)
    return noisy
