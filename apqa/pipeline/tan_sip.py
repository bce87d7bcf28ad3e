"""The TAN-SIP model of the astrometric fit: gnomonic projection, polynomial least squares of
the standard coordinates, one-to-one matching, and conversion to an astropy SIP WCS.

Split from :mod:`apqa.pipeline.astrometry`, which drives the matching and fitting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.spatial import cKDTree

ARCSEC_PER_DEG = 3600.0
MAS_PER_DEG = 3.6e6
_CRVAL_TOLERANCE_DEG = 1e-11  # recentring stops when the constant terms are below ~0.04 uas

# ---------------------------------------------------------------------------- geometry helpers


def gnomonic(ra: np.ndarray, dec: np.ndarray, ra0: float,
              dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (xi east, eta north; degrees) about the tangent point (ra0, dec0)."""
    a, d = np.deg2rad(ra - ra0), np.deg2rad(dec)
    d0 = np.deg2rad(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cos_c
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a)) / cos_c
    return np.rad2deg(xi), np.rad2deg(eta)


def deproject(xi: np.ndarray, eta: np.ndarray, ra0: float,
               dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`gnomonic`."""
    x, y, d0 = np.deg2rad(xi), np.deg2rad(eta), np.deg2rad(dec0)
    den = np.cos(d0) - y * np.sin(d0)
    ra = ra0 + np.rad2deg(np.arctan2(x, den))
    dec = np.rad2deg(np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, den)))
    return np.mod(ra, 360.0), dec


def separation_deg(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray,
                    dec2: np.ndarray) -> np.ndarray:
    """Angular distance (degrees), haversine form: accurate at milliarcseconds."""
    r1, d1, r2, d2 = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.rad2deg(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def poly_terms(order: int, min_degree: int = 0) -> list[tuple[int, int]]:
    """Exponents (p, q) of u^p v^q with min_degree <= p + q <= order."""
    return [(p, n - p) for n in range(min_degree, order + 1) for p in range(n, -1, -1)]


def design_matrix(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]],
            scale: float) -> np.ndarray:
    # Scaled coordinates keep the normal equations well conditioned at high order.
    us, vs = u / scale, v / scale
    return np.stack([us**p * vs**q for p, q in terms], axis=1)


def eval_poly(u: np.ndarray, v: np.ndarray, terms: list[tuple[int, int]],
          coeffs: np.ndarray) -> np.ndarray:
    return design_matrix(u, v, terms, 1.0) @ coeffs


def solve_normal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares by the normal equations, without multithreaded BLAS.

    The matrices are tall and thin (n x <= 36, scaled columns, well conditioned); threaded BLAS
    calls on them are slow on a busy machine, einsum is not.
    """
    ata = np.einsum("ki,kj->ij", a, a)
    atb = np.einsum("ki,kj->ij", a, b)
    return np.linalg.solve(ata, atb)


def match_one_to_one(sx: np.ndarray, sy: np.ndarray, rx: np.ndarray, ry: np.ndarray,
           radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour pairs within ``radius``: the closest pair wins a reference."""
    if len(rx) == 0 or len(sx) == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0)
    tree = cKDTree(np.column_stack([rx, ry]))
    dist, idx = tree.query(np.column_stack([sx, sy]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    s_idx, r_idx, dist = np.flatnonzero(ok), idx[ok], dist[ok]
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(r_idx[order], return_index=True)
    keep = np.sort(order[first])
    return s_idx[keep], r_idx[keep], dist[keep]


# ------------------------------------------------------------------------------ the TAN model


@dataclass
class TanPoly:
    """xi, eta (degrees about crval) as polynomials of u = x - cx, v = y - cy (0-based)."""

    ra0: float
    dec0: float
    cx: float
    cy: float
    terms: list[tuple[int, int]]
    c_xi: np.ndarray
    c_eta: np.ndarray

    def standard(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, v = x - self.cx, y - self.cy
        return eval_poly(u, v, self.terms, self.c_xi), eval_poly(u, v, self.terms, self.c_eta)


def fit_tan_poly(u: np.ndarray, v: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                  weight: np.ndarray, order: int, scale: float, ra0: float,
                  dec0: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Weighted least squares of xi, eta; CRVAL is moved until the constant terms vanish."""
    terms = poly_terms(order)
    a = design_matrix(u, v, terms, scale) * weight[:, None]
    norm = np.array([scale ** -(p + q) for p, q in terms])
    for _ in range(6):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        coeffs = solve_normal(a, np.column_stack([xi, eta]) * weight[:, None]) * norm[:, None]
        c_xi, c_eta = coeffs[:, 0], coeffs[:, 1]
        if max(abs(c_xi[0]), abs(c_eta[0])) < _CRVAL_TOLERANCE_DEG:
            break
        ra0, dec0 = (float(t) for t in deproject(c_xi[0], c_eta[0], ra0, dec0))
    c_xi[0] = c_eta[0] = 0.0
    return ra0, dec0, c_xi, c_eta


def order_for(n: int, max_order: int) -> int:
    """Highest order <= max_order with at least two matches per coefficient."""
    order = max_order
    while order > 1 and n < 2 * len(poly_terms(order)):
        order -= 1
    return order


# ------------------------------------------------------------------------------ output WCS


def inverse_sip(a_coef: dict[tuple[int, int], float], b_coef: dict[tuple[int, int], float],
                 order: int, half_w: float, half_h: float) -> tuple[dict, dict, float]:
    """AP/BP coefficients (u - U and v - V as polynomials of U, V) fitted on a grid."""
    gu, gv = np.meshgrid(np.linspace(-1.05 * half_w, 1.05 * half_w, 41),
                         np.linspace(-1.05 * half_h, 1.05 * half_h, 41))
    u, v = gu.ravel(), gv.ravel()
    fwd = list(a_coef)
    big_u = u + eval_poly(u, v, fwd, np.array([a_coef[t] for t in fwd]))
    big_v = v + eval_poly(u, v, fwd, np.array([b_coef[t] for t in fwd]))
    terms = poly_terms(order, min_degree=1)
    scale = max(half_w, half_h)
    a = design_matrix(big_u, big_v, terms, scale)
    norm = np.array([scale ** -(p + q) for p, q in terms])
    ap, bp = solve_normal(a, np.column_stack([u - big_u, v - big_v])).T
    err = np.hypot(a @ ap - (u - big_u), a @ bp - (v - big_v)).max()
    return (dict(zip(terms, ap * norm, strict=True)), dict(zip(terms, bp * norm, strict=True)),
            float(err))


def build_wcs(model: TanPoly, shape: tuple[int, int],
               inverse_order: int) -> tuple[WCS, float]:
    """An astropy TAN-SIP WCS of the model and the max error of its inverse polynomial."""
    height, width = shape
    cd = np.array([[model.c_xi[1], model.c_xi[2]], [model.c_eta[1], model.c_eta[2]]])
    order = max(p + q for p, q in model.terms)
    sip = order >= 2
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = width
    header["NAXIS2"] = height
    header["CTYPE1"] = "RA---TAN-SIP" if sip else "RA---TAN"
    header["CTYPE2"] = "DEC--TAN-SIP" if sip else "DEC--TAN"
    header["CUNIT1"] = header["CUNIT2"] = "deg"
    header["CRVAL1"], header["CRVAL2"] = model.ra0, model.dec0
    header["CRPIX1"], header["CRPIX2"] = model.cx + 1.0, model.cy + 1.0  # FITS is 1-based
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    header["RADESYS"] = "ICRS"
    inverse_error = 0.0
    if sip:
        cd_inv = np.linalg.inv(cd)
        a_coef, b_coef = {}, {}
        for k, t in enumerate(model.terms):
            if sum(t) >= 2:
                a_coef[t], b_coef[t] = cd_inv @ np.array([model.c_xi[k], model.c_eta[k]])
        ap, bp, inverse_error = inverse_sip(a_coef, b_coef, inverse_order,
                                             width / 2, height / 2)
        header["A_ORDER"] = header["B_ORDER"] = order
        header["AP_ORDER"] = header["BP_ORDER"] = inverse_order
        for (p, q), value in a_coef.items():
            header[f"A_{p}_{q}"] = value
            header[f"B_{p}_{q}"] = b_coef[(p, q)]
        for (p, q), value in ap.items():
            header[f"AP_{p}_{q}"] = value
            header[f"BP_{p}_{q}"] = bp[(p, q)]
    return WCS(header), inverse_error
