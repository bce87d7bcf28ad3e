"""Astrometric calibration: match detected sources to reference stars and fit a TAN-SIP WCS.

:func:`fit_astrometry` starts from a header WCS that may be tens of arcseconds and about a degree
off. It finds the rotation and offset with the strongest peak of pairwise source-reference pixel
offsets, then iterates one-to-one nearest-neighbour matching within a shrinking radius and a
weighted, sigma-clipped linear least-squares fit of the gnomonic standard coordinates (xi, eta) as
polynomials of the pixel position about the image centre. The linear terms are the CD matrix, the
higher ones the SIP A/B coefficients; inverse AP/BP coefficients are fitted on a grid.

Reference positions must already be at the exposure epoch (see
:func:`apqa.pipeline.refcat.propagate_to_epoch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from pydantic import Field

from apqa.config import ConfigModel
from apqa.errors import InputError, StageError
from apqa.pipeline.tan_sip import (
    ARCSEC_PER_DEG,
    MAS_PER_DEG,
    TanPoly,
    build_wcs,
    fit_tan_poly,
    gnomonic,
    match_one_to_one,
    order_for,
    poly_terms,
    separation_deg,
    solve_normal,
)

_NEVER_CLIP_MAS = 0.1  # noiseless data must not be clipped on rounding noise


class AstrometryConfig(ConfigModel):
    """Configuration of :func:`fit_astrometry`.

    Examples
    --------
    >>> AstrometryConfig(sip_order=4).sip_order
    4
    """

    max_offset_arcsec: float = Field(
        40.0, gt=0, description="largest header-WCS offset searched, along each pixel axis")
    max_rotation_deg: float = Field(1.2, ge=0, le=10, description="largest rotation searched")
    rotation_step_deg: float = Field(0.05, gt=0, le=1, description="trial rotation step")
    offset_bin_arcsec: float = Field(
        0.5, gt=0, description="offset histogram bin; peaks are summed over 2x2 bins")
    n_initial_sources: int = Field(200, ge=3, description="brightest sources in the first match")
    n_initial_refs: int = Field(300, ge=3, description="brightest references in the first match")
    min_initial_pairs: int = Field(
        6, ge=3, description="pairs needed in the offset peak to accept the first match")
    initial_match_radius_arcsec: float = Field(
        2.0, gt=0, description="match radius of the first iteration")
    match_radius_arcsec: float = Field(
        0.75, gt=0, description="match radius of the final iterations")
    n_iterations: int = Field(5, ge=1, le=50, description="match-and-fit iterations")
    sip_order: int = Field(3, ge=1, le=7, description="polynomial order of the SIP distortion")
    inverse_extra_order: int = Field(
        2, ge=0, le=4, description="inverse (AP/BP) order minus sip_order")
    clip_sigma: float = Field(3.0, gt=0, description="outlier clip in robust sigma")
    error_floor_mas: float = Field(
        5.0, gt=0, description="added in quadrature to source errors (reference errors, seeing)")
    min_matches: int = Field(10, ge=3, description="fewest clipped matches accepted")


@dataclass
class AstrometryResult:
    """The fitted WCS and its matches.

    Attributes
    ----------
    wcs
        TAN-SIP WCS (plain TAN when too few matches allowed only a linear fit).
    matches
        One row per final match: ``source_index`` (index label in ``sources``), ``ref_index``
        (position in the reference arrays), ``separation_mas`` (on-sky, fitted WCS), ``dx``,
        ``dy`` (source minus reference projected with the fitted WCS, pixels) and ``used``
        (False for sigma-clipped matches).
    n_matches
        Matches used in the final fit.
    scatter_mas
        Root-mean-square on-sky separation of the used matches (both axes together).
    initial_offset_px, initial_rotation_deg
        The first match: reference pixel positions p from the header WCS land on their sources
        at c + R(rotation) (p - c) + (dx, dy), with c the image centre and R counter-clockwise
        in (x, y). A header WCS 30" east of the truth gives dx ~ -30" / pixel scale.
    initial_pairs
        Size of the offset peak of the first match.
    sip_order
        Order of the fitted polynomial (may be below the configured order with few matches).
    n_refs_in_image
        Reference stars projected onto the image (with the search margin) by the header WCS.
    inverse_max_error_px
        Largest error of the AP/BP inverse polynomial over the image.
    """

    wcs: WCS
    matches: pd.DataFrame
    n_matches: int
    scatter_mas: float
    initial_offset_px: tuple[float, float]
    initial_rotation_deg: float
    initial_pairs: int
    sip_order: int
    n_refs_in_image: int
    inverse_max_error_px: float


# --------------------------------------------------------------------------- initial matching


def _rotate(x: np.ndarray, y: np.ndarray, centre: tuple[float, float],
            theta_deg: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(np.deg2rad(theta_deg)), np.sin(np.deg2rad(theta_deg))
    bx, by = x - centre[0], y - centre[1]
    return centre[0] + c * bx - s * by, centre[1] + s * bx + c * by


def _initial_match(sx: np.ndarray, sy: np.ndarray, rx: np.ndarray, ry: np.ndarray,
                   centre: tuple[float, float], max_off: float, bin_px: float,
                   config: AstrometryConfig) -> tuple[float, float, float, int]:
    """Rotation (deg, about ``centre``) and shift (px) taking references onto sources.

    For each trial rotation, all source-minus-reference offsets within ``max_off`` along each
    axis are histogrammed; the strongest 2x2-bin window (robust to a peak split between bins)
    wins. Rotation and shift are then refined by a rigid least-squares fit of the pairs in it.
    Returns (rotation, dx, dy, number of pairs in the peak).
    """
    nb = max(int(np.ceil(2 * max_off / bin_px)), 2)
    n_steps = round(config.max_rotation_deg / config.rotation_step_deg)
    thetas = np.arange(-n_steps, n_steps + 1) * config.rotation_step_deg
    peaks = np.zeros((thetas.size, 3))
    for n, theta in enumerate(thetas):
        qx, qy = _rotate(rx, ry, centre, theta)
        ox, oy = sx[:, None] - qx[None, :], sy[:, None] - qy[None, :]
        ok = (np.abs(ox) < max_off) & (np.abs(oy) < max_off)
        ix = np.minimum(((ox[ok] + max_off) / bin_px).astype(np.intp), nb - 1)
        iy = np.minimum(((oy[ok] + max_off) / bin_px).astype(np.intp), nb - 1)
        hist = np.bincount(ix * nb + iy, minlength=nb * nb).reshape(nb, nb)
        window = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        i, j = np.unravel_index(int(np.argmax(window)), window.shape)
        # The window spans bins i and i + 1: its centre is their shared edge.
        peaks[n] = window[i, j], (i + 1) * bin_px - max_off, (j + 1) * bin_px - max_off
    # Neighbouring trial rotations often tie: take the middle of the tied ones.
    tied = np.flatnonzero(peaks[:, 0] == peaks[:, 0].max())
    best = tied[tied.size // 2]
    count, dx, dy = int(peaks[best, 0]), peaks[best, 1], peaks[best, 2]
    theta = float(thetas[best])
    qx, qy = _rotate(rx, ry, centre, theta)
    ox, oy = sx[:, None] - qx[None, :], sy[:, None] - qy[None, :]
    si, ri = np.nonzero((np.abs(ox - dx) <= bin_px) & (np.abs(oy - dy) <= bin_px))
    if si.size >= 3:
        # Rigid (Procrustes) fit: rotation from the cross and dot products about the means.
        ax, ay = rx[ri] - rx[ri].mean(), ry[ri] - ry[ri].mean()
        bx, by = sx[si] - sx[si].mean(), sy[si] - sy[si].mean()
        theta = float(np.rad2deg(np.arctan2(np.sum(ax * by - ay * bx),
                                            np.sum(ax * bx + ay * by))))
        mx, my = _rotate(np.array([rx[ri].mean()]), np.array([ry[ri].mean()]), centre, theta)
        dx, dy = float(sx[si].mean() - mx[0]), float(sy[si].mean() - my[0])
    return theta, float(dx), float(dy), count


# ------------------------------------------------------------------------------ the fit


def _refs_over_image(wcs: WCS, ref_ra: np.ndarray, ref_dec: np.ndarray,
                     shape: tuple[int, int], max_off: float, config: AstrometryConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and header-WCS pixel positions of the references that may fall on the image."""
    height, width = shape
    cx, cy = (width - 1) / 2, (height - 1) / 2
    ra_c, dec_c = (float(t) for t in wcs.all_pix2world(cx, cy, 0))
    scale_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    half_diag = np.hypot(width, height) / 2
    margin = max_off + np.deg2rad(config.max_rotation_deg) * half_diag + 2
    # An angular pre-cut first: the SIP inversion is slow and fails far from the image.
    near = np.flatnonzero(separation_deg(ra_c, dec_c, ref_ra, ref_dec)
                          < (half_diag + np.sqrt(2) * margin) * scale_deg * 1.05)
    rx = ry = np.zeros(0)
    if near.size:
        rx, ry = wcs.all_world2pix(ref_ra[near], ref_dec[near], 0, quiet=True)
        inside = ((rx > -margin) & (rx < width - 1 + margin)
                  & (ry > -margin) & (ry < height - 1 + margin))
        near, rx, ry = near[inside], rx[inside], ry[inside]
    if near.size == 0:
        span = (f"RA {ref_ra.min():.4f}..{ref_ra.max():.4f}, Dec {ref_dec.min():.4f}.."
                f"{ref_dec.max():.4f} deg" if ref_ra.size else "no stars at all")
        raise StageError(
            f"astrometry: wrong refcat region: no reference stars over the image centred at "
            f"RA {ra_c:.4f}, Dec {dec_c:.4f} deg ({ref_ra.size} stars in the refcat, {span})")
    return near, rx, ry


def _clipped_fit(u: np.ndarray, v: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                 sigma: np.ndarray, config: AstrometryConfig, centre: tuple[float, float],
                 scale: float, ra0: float, dec0: float) -> tuple[TanPoly, np.ndarray]:
    """Fit matched pairs, clipping outliers until the kept set is stable.

    ``sigma`` (mas) weights the fit and normalises residuals. Returns the model and the kept
    pairs it was fitted to.
    """
    used = np.ones(u.size, dtype=bool)
    for _ in range(10):
        order = order_for(int(used.sum()), config.sip_order)
        ra0, dec0, c_xi, c_eta = fit_tan_poly(u[used], v[used], ra[used], dec[used],
                                               1.0 / sigma[used], order, scale, ra0, dec0)
        model = TanPoly(ra0, dec0, centre[0], centre[1], poly_terms(order), c_xi, c_eta)
        m_xi, m_eta = model.standard(u + centre[0], v + centre[1])
        f_xi, f_eta = gnomonic(ra, dec, ra0, dec0)
        r_mas = np.hypot(m_xi - f_xi, m_eta - f_eta) * MAS_PER_DEG
        z = r_mas / sigma
        # Robust sigma of a 2-d Gaussian: the median of |r|^2 is 2 ln 2 sigma^2.
        robust = np.sqrt(np.median(z[used] ** 2) / (2 * np.log(2)))
        new_used = (z <= config.clip_sigma * robust) | (r_mas < _NEVER_CLIP_MAS)
        if np.array_equal(new_used, used) or new_used.sum() < config.min_matches:
            break
        used = new_used
    return model, used


def _source_arrays(sources: pd.DataFrame, config: AstrometryConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valid rows' positions, index labels, errors (px) and the brightest-first selection."""
    for column in ("x", "y"):
        if column not in sources.columns:
            raise InputError(f"sources: column '{column}' not found; expected 0-based pixel "
                             f"positions 'x', 'y' (found {list(sources.columns)})")
    x = pd.to_numeric(sources["x"], errors="coerce").to_numpy(dtype=np.float64)
    y = pd.to_numeric(sources["y"], errors="coerce").to_numpy(dtype=np.float64)
    valid = np.isfinite(x) & np.isfinite(y)
    if "xErr" in sources.columns and "yErr" in sources.columns:
        ex = pd.to_numeric(sources["xErr"], errors="coerce").to_numpy(dtype=np.float64)
        ey = pd.to_numeric(sources["yErr"], errors="coerce").to_numpy(dtype=np.float64)
        err = np.sqrt((ex**2 + ey**2) / 2)
        good = np.isfinite(err) & valid
        # Unknown errors count as typical ones rather than perfect ones.
        err = np.where(good, err, np.median(err[good]) if good.any() else 0.0)
    else:
        err = np.zeros(len(x))
    labels = sources.index.to_numpy()[valid]
    x, y, err = x[valid], y[valid], err[valid]
    if "flux" in sources.columns:
        flux = pd.to_numeric(sources["flux"], errors="coerce").to_numpy(dtype=np.float64)[valid]
        bright = np.argsort(-np.nan_to_num(flux, nan=-np.inf), kind="stable")
    else:
        bright = np.arange(len(x))
    return x, y, labels, err, bright[:config.n_initial_sources]


def fit_astrometry(
    sources: pd.DataFrame,
    wcs: WCS,
    ref_ra: np.ndarray,
    ref_dec: np.ndarray,
    shape: tuple[int, int],
    config: AstrometryConfig | None = None,
    ref_mag: np.ndarray | None = None,
    ref_err_mas: np.ndarray | None = None,
) -> AstrometryResult:
    """Match sources to reference stars and fit a TAN-SIP WCS.

    Parameters
    ----------
    sources
        Detected sources: ``x``, ``y`` (0-based pixels), optionally ``xErr``, ``yErr`` (pixels,
        used as weights) and ``flux`` (higher is brighter; selects the sources of the first
        match, otherwise the table order is used). Rows with non-finite positions are ignored.
    wcs
        Header (guess) WCS, possibly off by up to ``max_offset_arcsec`` along each axis and
        ``max_rotation_deg``.
    ref_ra, ref_dec
        Reference positions (degrees) at the exposure epoch.
    shape
        Image shape (height, width).
    config
        Fit configuration; the defaults when None.
    ref_mag
        Reference magnitudes (brighter first in the first match); otherwise catalogue order.
    ref_err_mas
        1-sigma error (mas, per axis) of each reference position at the exposure epoch, e.g.
        from :func:`apqa.pipeline.refcat.position_error_at_epoch`; weights the fit with the
        source errors and ``error_floor_mas``.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    InputError
        Missing source columns or inconsistent reference arrays.
    StageError
        No reference stars over the image (wrong refcat region), no consistent first match, or
        fewer than ``min_matches`` matches.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2)
    >>> w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.crval, w.wcs.crpix = [150.0, 2.0], [500.5, 500.5]
    >>> w.wcs.cd = [[-5e-5, 0], [0, 5e-5]]
    >>> rng = np.random.default_rng(1)
    >>> x, y = rng.uniform(0, 999, 300), rng.uniform(0, 999, 300)
    >>> ra, dec = w.all_pix2world(x, y, 0)
    >>> res = fit_astrometry(pd.DataFrame({"x": x, "y": y}), w, ra, dec, (1000, 1000))
    >>> res.n_matches, res.scatter_mas < 1
    (300, True)
    """
    config = config or AstrometryConfig()
    height, width = (int(n) for n in shape)
    ref_ra = np.asarray(ref_ra, dtype=np.float64)
    ref_dec = np.asarray(ref_dec, dtype=np.float64)
    if ref_ra.shape != ref_dec.shape or ref_ra.ndim != 1:
        raise InputError(f"reference catalog: ref_ra and ref_dec: expected 1-d arrays of equal "
                         f"length, got shapes {ref_ra.shape} and {ref_dec.shape}")
    if not (np.isfinite(ref_ra).all() and np.isfinite(ref_dec).all()):
        raise InputError("reference catalog: ref_ra/ref_dec: expected finite degrees, found "
                         f"{int((~np.isfinite(ref_ra) | ~np.isfinite(ref_dec)).sum())} non-finite")
    for name, values in (("ref_mag", ref_mag), ("ref_err_mas", ref_err_mas)):
        if values is not None and np.shape(values) != ref_ra.shape:
            raise InputError(f"reference catalog: {name}: expected {ref_ra.size} values, "
                             f"got shape {np.shape(values)}")
    sx, sy, labels, s_err, bright = _source_arrays(sources, config)

    cx, cy = (width - 1) / 2, (height - 1) / 2
    scale_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    max_off = config.max_offset_arcsec / ARCSEC_PER_DEG / scale_deg
    near, rx, ry = _refs_over_image(wcs, ref_ra, ref_dec, (height, width), max_off, config)

    # (a) First match: brightest sources against brightest references.
    if ref_mag is not None:
        mag = np.asarray(ref_mag, dtype=np.float64)[near]
        pick = np.argsort(np.nan_to_num(mag, nan=np.inf), kind="stable")[:config.n_initial_refs]
    else:
        pick = np.arange(min(near.size, config.n_initial_refs))
    bin_px = config.offset_bin_arcsec / ARCSEC_PER_DEG / scale_deg
    theta, dx, dy, n_pairs = _initial_match(sx[bright], sy[bright], rx[pick], ry[pick],
                                            (cx, cy), max_off, bin_px, config)
    if n_pairs < config.min_initial_pairs:
        raise StageError(
            f"astrometry: no consistent first match: the strongest offset peak has {n_pairs} "
            f"source-reference pairs (need {config.min_initial_pairs}) from {sx.size} sources "
            f"({bright.size} brightest used) and {near.size} reference stars over the image "
            f"({pick.size} used); searched +-{config.max_offset_arcsec}\" and "
            f"+-{config.max_rotation_deg} deg")

    # Sources mapped back into the header WCS's frame give their first sky positions.
    px, py = _rotate(sx - dx, sy - dy, (cx, cy), -theta)
    s_ra, s_dec = wcs.all_pix2world(px, py, 0)
    p0x, p0y = _rotate(np.array([cx - dx]), np.array([cy - dy]), (cx, cy), -theta)
    ra0, dec0 = (float(t[0]) for t in wcs.all_pix2world(p0x, p0y, 0))
    s_xi, s_eta = gnomonic(s_ra, s_dec, ra0, dec0)

    # (b) Iterate: match within a shrinking radius, fit, clip.
    r_ra, r_dec = ref_ra[near], ref_dec[near]
    src_mas = s_err * scale_deg * MAS_PER_DEG
    ref_mas = (np.zeros(near.size) if ref_err_mas is None
               else np.nan_to_num(np.asarray(ref_err_mas, dtype=np.float64)[near]))
    n_shrink = max(config.n_iterations - 2, 1)
    poly_scale = max(width, height) / 2
    model: TanPoly | None = None
    for it in range(config.n_iterations):
        frac = min(it / n_shrink, 1.0)
        radius = (config.initial_match_radius_arcsec ** (1 - frac)
                  * config.match_radius_arcsec ** frac)
        r_xi, r_eta = gnomonic(r_ra, r_dec, ra0, dec0)
        si, ri, _ = match_one_to_one(s_xi * ARCSEC_PER_DEG, s_eta * ARCSEC_PER_DEG,
                           r_xi * ARCSEC_PER_DEG, r_eta * ARCSEC_PER_DEG, radius)
        if si.size < config.min_matches:
            raise StageError(
                f"astrometry: too few matches: {si.size} within {radius:.2f}\" (need "
                f"{config.min_matches}) from {sx.size} sources and {near.size} reference stars "
                f"over the image (first-match peak {n_pairs} pairs, iteration {it + 1})")
        sigma = np.sqrt(src_mas[si] ** 2 + ref_mas[ri] ** 2 + config.error_floor_mas**2)
        model, used = _clipped_fit(sx[si] - cx, sy[si] - cy, r_ra[ri], r_dec[ri], sigma,
                                   config, (cx, cy), poly_scale, ra0, dec0)
        ra0, dec0 = model.ra0, model.dec0
        s_xi, s_eta = model.standard(sx, sy)

    assert model is not None  # n_iterations >= 1
    order = max(p + q for p, q in model.terms)
    if order < config.sip_order and wcs.sip is not None:
        # Too few stars for the distortion polynomial: keep the header's distortion (the
        # camera model) and fit only an affine correction to it.
        model = _affine_on_header(wcs, sx[si][used], sy[si][used], r_ra[ri][used],
                                  r_dec[ri][used], (height, width), config, poly_scale)
        order = max(p + q for p, q in model.terms)
    out_wcs, inverse_error = build_wcs(model, (height, width),
                                        config.sip_order + config.inverse_extra_order)
    _check_round_trip(out_wcs, width, height)

    # (c) Residuals with the output WCS itself.
    m_ra, m_dec = out_wcs.all_pix2world(sx[si], sy[si], 0)
    sep = separation_deg(m_ra, m_dec, r_ra[ri], r_dec[ri]) * MAS_PER_DEG
    ref_x, ref_y = out_wcs.all_world2pix(r_ra[ri], r_dec[ri], 0)
    matches = pd.DataFrame({
        "source_index": labels[si], "ref_index": near[ri], "separation_mas": sep,
        "dx": sx[si] - ref_x, "dy": sy[si] - ref_y, "used": used,
    })
    return AstrometryResult(
        wcs=out_wcs, matches=matches, n_matches=int(used.sum()),
        scatter_mas=float(np.sqrt(np.mean(sep[used] ** 2))),
        initial_offset_px=(float(dx), float(dy)), initial_rotation_deg=float(theta),
        initial_pairs=int(n_pairs), sip_order=int(order), n_refs_in_image=int(near.size),
        inverse_max_error_px=inverse_error,
    )


def _affine_on_header(wcs: WCS, x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                      shape: tuple[int, int], config: AstrometryConfig,
                      poly_scale: float) -> TanPoly:
    """The header WCS composed with an affine pixel correction fitted to the matches,
    re-expressed as a full-order TAN polynomial through a dense grid of points."""
    height, width = shape
    hx, hy = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, quiet=True)
    design = np.column_stack([np.ones_like(x), x, y])
    coeff = solve_normal(design, np.column_stack([hx, hy]))  # (3, 2): source pixel -> header pixel
    gx, gy = np.meshgrid(np.linspace(0, width - 1, 17), np.linspace(0, height - 1, 33))
    gx, gy = gx.ravel(), gy.ravel()
    mapped = np.column_stack([np.ones_like(gx), gx, gy]) @ coeff
    g_ra, g_dec = wcs.all_pix2world(mapped[:, 0], mapped[:, 1], 0)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    ra0, dec0 = (float(t[0]) for t in wcs.all_pix2world([cx], [cy], 0))
    ra0, dec0, c_xi, c_eta = fit_tan_poly(gx - cx, gy - cy, g_ra, g_dec, np.ones_like(gx),
                                           config.sip_order, poly_scale, ra0, dec0)
    return TanPoly(ra0, dec0, cx, cy, poly_terms(config.sip_order), c_xi, c_eta)


def _check_round_trip(out_wcs: WCS, width: int, height: int, tol_px: float = 1e-3) -> None:
    """all_pix2world then all_world2pix must return the pixels of a grid over the image."""
    gx, gy = np.meshgrid(np.linspace(0, width - 1, 9), np.linspace(0, height - 1, 17))
    ra, dec = out_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    bx, by = out_wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, quiet=True)
    err = float(np.hypot(bx - gx.ravel(), by - gy.ravel()).max())
    if not err < tol_px:
        raise StageError(f"astrometry: fitted WCS does not round-trip: pixel -> sky -> pixel "
                         f"error up to {err:.3g} px (tolerance {tol_px} px)")
