"""The warp's coordinate mapping: science pixel -> template pixel through the sky, exact on a
coarse grid and interpolated by bicubic splines (checked and refined), and local Jacobians.

Split from :mod:`apqa.pipeline.diffim.warp`, which holds the public API and the main flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from apqa.datamodel.header_wcs import as_wcs
from apqa.errors import InputError, StageError
from apqa.log import get_logger

if TYPE_CHECKING:
    from astropy.wcs import WCS
    from scipy.interpolate import BSpline, RectBivariateSpline

    from apqa.datamodel.header_wcs import HeaderWcs
    from apqa.pipeline.diffim.warp import WarpConfig

# The warp's messages keep the logger of the warp module they come from.
log = get_logger("apqa.pipeline.diffim.warp")

#: Smallest grid step the mapping refinement goes down to.
_MIN_GRID_STEP = 4
#: Tolerance of the iterative TAN-SIP inversion (pixels), well below ``max_mapping_error``.
_WORLD2PIX_TOLERANCE = 1e-7
#: Half-width (science pixels) of the finite differences that give the PSF's local Jacobian.
_JACOBIAN_STEP = 1.0


def _celestial(wcs: WCS | HeaderWcs | None, what: str) -> WCS:
    from astropy.wcs import WCS

    wcs = as_wcs(wcs)
    if wcs is None or not isinstance(wcs, WCS) or not wcs.has_celestial:
        raise InputError(f"{what}: no celestial WCS (expected an astropy WCS with RA/Dec axes)")
    return wcs.celestial


def _exact_map(science_wcs: WCS, template_wcs: WCS, x: np.ndarray,
               y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template pixel coordinates of science pixel coordinates (0-based), through the sky."""
    ra, dec = science_wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        u, v = template_wcs.all_world2pix(ra, dec, 0, tolerance=_WORLD2PIX_TOLERANCE,
                                          maxiter=50, quiet=True)
    return np.asarray(u, float), np.asarray(v, float)


def _grid_nodes(size: int, step: int) -> np.ndarray:
    """Nodes every ``step`` pixels plus the last pixel; at least 4 (bicubic) when size allows."""
    nodes = np.arange(0, size, step, dtype=float)
    if nodes[-1] != size - 1:
        nodes = np.append(nodes, size - 1.0)
    if nodes.size < 4 and size >= 4:
        nodes = np.linspace(0.0, size - 1.0, 4)
    return nodes


def _fill_non_finite(u: np.ndarray, v: np.ndarray, xx: np.ndarray,
                     yy: np.ndarray) -> None:
    """Replace non-finite mapped positions (where the template projection fails, far outside it)
    by an affine fit of the finite ones, so the spline stays finite; in place."""
    bad = ~(np.isfinite(u) & np.isfinite(v))
    if not bad.any():
        return
    design = np.stack([np.ones(xx.size), xx.ravel(), yy.ravel()], axis=1)
    good = ~bad.ravel()
    cu, *_ = np.linalg.lstsq(design[good], u.ravel()[good], rcond=None)
    cv, *_ = np.linalg.lstsq(design[good], v.ravel()[good], rcond=None)
    u[bad] = (design @ cu).reshape(u.shape)[bad]
    v[bad] = (design @ cv).reshape(v.shape)[bad]


def _row_evaluator(spline: RectBivariateSpline, width: int) -> BSpline:
    """The tensor-product spline collapsed onto the output columns: a 1-d spline in y whose
    coefficients are whole rows, so that a chunk of rows costs ~4 multiply-adds per pixel
    (3x faster than evaluating the 2-d spline on the grid)."""
    from scipy.interpolate import BSpline  # imported when warping: 0.16 s of every start-up

    (t_y, t_x), (k_y, k_x) = spline.get_knots(), spline.degrees
    coeffs = spline.get_coeffs().reshape(t_y.size - k_y - 1, t_x.size - k_x - 1)
    columns = BSpline.design_matrix(np.arange(width, dtype=float), t_x, k_x)
    return BSpline(t_y, np.asarray((columns @ coeffs.T).T), k_y, axis=0)


@dataclass
class _Mapping:
    """Interpolated science -> template pixel mapping and its Jacobian determinant."""

    u: RectBivariateSpline
    v: RectBivariateSpline
    det: RectBivariateSpline
    step: int
    error: float

    def row_evaluators(self, width: int) -> tuple[BSpline, BSpline, BSpline]:
        """Evaluators of (u, v, det J) for whole science rows."""
        return (_row_evaluator(self.u, width), _row_evaluator(self.v, width),
                _row_evaluator(self.det, width))


def _spline(ys: np.ndarray, xs: np.ndarray, values: np.ndarray,
            degree: int = 3) -> RectBivariateSpline:
    from scipy.interpolate import RectBivariateSpline

    k_y = min(degree, ys.size - 1)
    k_x = min(degree, xs.size - 1)
    return RectBivariateSpline(ys, xs, values, kx=k_y, ky=k_x, s=0)


def _check_points(xs: np.ndarray, ys: np.ndarray, n: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random points plus the centres of ``n`` random grid cells, where the spline's
    error peaks."""
    x = rng.uniform(xs[0], xs[-1], n)
    y = rng.uniform(ys[0], ys[-1], n)
    i = rng.integers(0, max(xs.size - 1, 1), n)
    j = rng.integers(0, max(ys.size - 1, 1), n)
    cx = 0.5 * (xs[i] + xs[np.minimum(i + 1, xs.size - 1)])
    cy = 0.5 * (ys[j] + ys[np.minimum(j + 1, ys.size - 1)])
    return np.concatenate([x, cx]), np.concatenate([y, cy])


def _build_mapping(science_wcs: WCS, template_wcs: WCS, shape: tuple[int, int],
                   template_shape: tuple[int, int], config: WarpConfig) -> _Mapping:
    """Exact mapping on a coarse grid, interpolated, checked, refined when not accurate enough.

    Raises ``StageError`` when no node of the grid (nor a check point) falls on the template.
    """
    height, width = shape
    t_height, t_width = template_shape
    step = config.grid_step
    while True:
        xs = _grid_nodes(width, step)
        ys = _grid_nodes(height, step)
        xx, yy = np.meshgrid(xs, ys)
        u, v = _exact_map(science_wcs, template_wcs, xx, yy)
        rng = np.random.default_rng(20_240_611)  # fixed: the same check points on every run
        cx, cy = _check_points(xs, ys, config.n_check_points, rng)
        cu, cv = _exact_map(science_wcs, template_wcs, cx, cy)
        # Accuracy matters only where the footprint can reach template data.
        margin = 8.0
        relevant = ((cu > -margin) & (cu < t_width - 1 + margin)
                    & (cv > -margin) & (cv < t_height - 1 + margin))
        inside = ((u >= -0.5) & (u <= t_width - 0.5) & (v >= -0.5) & (v <= t_height - 0.5))
        if not inside.any() and not relevant.any():
            if not np.isfinite(u).any():
                raise StageError("warp: no overlap: the science grid does not project onto the "
                                 "template's tangent plane")
            raise StageError(
                f"warp: no overlap: no science pixel of the {width}x{height} grid maps onto the "
                f"{t_width}x{t_height} template (the grid spans template x "
                f"{np.nanmin(u):.1f}..{np.nanmax(u):.1f}, "
                f"y {np.nanmin(v):.1f}..{np.nanmax(v):.1f})")
        _fill_non_finite(u, v, xx, yy)
        spline_u, spline_v = _spline(ys, xs, u), _spline(ys, xs, v)
        if relevant.any():
            err = np.hypot(spline_u(cy[relevant], cx[relevant], grid=False) - cu[relevant],
                           spline_v(cy[relevant], cx[relevant], grid=False) - cv[relevant])
            error = float(np.nanmax(err)) if np.isfinite(err).any() else 0.0
        else:
            error = 0.0
        if error <= config.max_mapping_error or step <= _MIN_GRID_STEP:
            break
        log.debug("warp: mapping error %.4f px on a %d px grid; refining", error, step)
        step = max(_MIN_GRID_STEP, step // 2)
    if error > config.max_mapping_error:
        log.warning("warp: interpolated mapping is off by up to %.4f px even on a %d px grid",
                    error, step)
    # Jacobian determinant at the nodes from the spline's derivatives (RectBivariateSpline's
    # first argument is y); it varies so slowly that bilinear interpolation is ample.
    du_dx = spline_u(ys, xs, dy=1)
    du_dy = spline_u(ys, xs, dx=1)
    dv_dx = spline_v(ys, xs, dy=1)
    dv_dy = spline_v(ys, xs, dx=1)
    det = _spline(ys, xs, du_dx * dv_dy - du_dy * dv_dx, degree=1)
    return _Mapping(spline_u, spline_v, det, step, error)


def _local_jacobians(science_wcs: WCS, template_wcs: WCS, x: np.ndarray,
                     y: np.ndarray) -> np.ndarray:
    """d(template pix)/d(science pix) at science positions by central differences, (N, 2, 2)."""
    h = _JACOBIAN_STEP
    px = np.concatenate([x + h, x - h, x, x])
    py = np.concatenate([y, y, y + h, y - h])
    u, v = _exact_map(science_wcs, template_wcs, px, py)
    n = x.size
    jac = np.empty((n, 2, 2))
    jac[:, 0, 0] = (u[:n] - u[n:2 * n]) / (2 * h)
    jac[:, 1, 0] = (v[:n] - v[n:2 * n]) / (2 * h)
    jac[:, 0, 1] = (u[2 * n:3 * n] - u[3 * n:]) / (2 * h)
    jac[:, 1, 1] = (v[2 * n:3 * n] - v[3 * n:]) / (2 * h)
    return jac
