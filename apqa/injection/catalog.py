"""Injection catalogs: generating them (Halton positions, magnitudes, kinds, hosts), validating
them and reading/writing them as Parquet.

A catalog row is one fake. Columns (see ``/work/helper/CONTRACTS.md``): ``injection_id``,
``kind`` (point | sersic | trail | stamp), ``ra``/``dec`` (deg) or ``x``/``y`` (px), ``mag``
(AB), shape columns where the kind needs them (``n``, ``half_light_radius`` arcsec, ``q``,
``beta`` deg, ``trail_length`` arcsec, ``trail_angle`` deg, ``stamp`` path), and from the
generator ``fake_class``, ``target`` (science | template | both), ``template_mag``, ``host_id``
and ``host_sb``.

``beta`` and ``trail_angle`` are angles on the sky from +u (west) towards +v (north), GalSim's
world convention, so a fake looks the same in every visit whatever the camera rotation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from apqa.atomic import write_parquet
from apqa.config import ConfigModel
from apqa.datamodel import Exposure
from apqa.errors import InputError
from apqa.injection.hosts import sample_offsets, select_hosts, surface_brightness
from apqa.log import get_logger
from apqa.sim.render import local_jacobians

log = get_logger(__name__)

KINDS = ("point", "sersic", "trail", "stamp")
FAKE_CLASSES = ("isolated", "hosted", "variable", "negative", "trail", "sersic", "stamp")
TARGETS = ("science", "template", "both")
#: Kind drawn and image(s) drawn into, per fake class.
CLASS_KIND = {"isolated": "point", "hosted": "point", "variable": "point", "negative": "point",
              "trail": "trail", "sersic": "sersic", "stamp": "stamp"}
CLASS_TARGET = {"variable": "both", "negative": "template"}
#: GalSim's Sersic index range (Rubin's source_injection rejects indices outside it too).
SERSIC_N_RANGE = (0.3, 6.2)
SHAPE_COLUMNS = {"sersic": ("n", "half_light_radius", "q", "beta"),
                 "trail": ("trail_length", "trail_angle"), "stamp": ("stamp",), "point": ()}
#: Trail rates are in degrees per day: arcsec per second = rate * 3600 / 86400.
_ARCSEC_PER_S_PER_DEG_PER_DAY = 3600.0 / 86400.0


class CatalogConfig(ConfigModel):
    """How :func:`generate_catalog` draws fakes. Ranges are ``[low, high]``, drawn uniformly."""

    n: int = Field(100, ge=0, description="number of fakes (ignored when density is set)")
    density: float | None = Field(None, gt=0, description="fakes per deg^2 of the exposure")
    mix: dict[str, float] = Field(default_factory=lambda: {"isolated": 1.0},
                                  description="fraction of fakes per fake_class")
    mag_range: tuple[float, float] = (20.0, 25.0)
    margin: float = Field(20.0, ge=0, description="pixels kept free along the image edges")
    sersic_n: tuple[float, float] = (0.5, 4.0)
    sersic_hlr: tuple[float, float] = Field((0.2, 2.0), description="arcsec")
    sersic_q: tuple[float, float] = (0.3, 1.0)
    variable_dmag: tuple[float, float] = Field(
        (0.3, 1.5), description="|template_mag - mag| of variables, either sign")
    trail_rate: tuple[float, float] = Field((0.5, 10.0), description="deg/day")
    exposure_time: float | None = Field(
        None, gt=0, description="s; default: the exposure's visit info")
    host_mag: tuple[float, float] = (17.0, 23.0)
    host_min_extendedness: float = 0.5
    stamps: list[str] = Field(default_factory=list, description="FITS postage stamps to use")
    id_start: int = Field(0, ge=0, description="first injection_id")

    @model_validator(mode="after")
    def _check(self) -> CatalogConfig:
        unknown = sorted(set(self.mix) - set(FAKE_CLASSES))
        if unknown:
            raise ValueError(f"mix: unknown fake classes {unknown}; expected {FAKE_CLASSES}")
        if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError("mix: fractions must be >= 0 with a positive sum")
        for name in ("mag_range", "sersic_n", "sersic_hlr", "sersic_q", "variable_dmag",
                     "trail_rate", "host_mag"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name}: expected low <= high, got [{low}, {high}]")
        if not (SERSIC_N_RANGE[0] <= self.sersic_n[0] and self.sersic_n[1] <= SERSIC_N_RANGE[1]):
            raise ValueError(f"sersic_n: expected within {list(SERSIC_N_RANGE)}")
        if not (0 < self.sersic_q[0] and self.sersic_q[1] <= 1):
            raise ValueError("sersic_q: expected within (0, 1]")
        return self


def _allocate(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split ``n`` over the classes by largest remainder (counts sum to ``n`` exactly)."""
    names = [c for c in FAKE_CLASSES if mix.get(c, 0) > 0]
    share = np.array([mix[c] for c in names]) / sum(mix[c] for c in names) * n
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return dict(zip(names, counts.tolist(), strict=True))


def exposure_area_deg2(exposure: Exposure) -> float:
    """Sky area of the exposure (deg^2) from the WCS Jacobian at its centre."""
    if exposure.wcs is None:
        raise InputError("exposure has no WCS: give a number of fakes, not a density")
    jac = local_jacobians(exposure.wcs, np.array([(exposure.width - 1) / 2]),
                          np.array([(exposure.height - 1) / 2]))[0]
    return float(abs(np.linalg.det(jac)) * exposure.width * exposure.height / 3600.0**2)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], n)


def generate_catalog(exposure: Exposure, config: CatalogConfig | None = None, *,
                     hosts: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """Draw an injection catalog for ``exposure``.

    Positions of unhosted fakes follow a scrambled Halton sequence over the exposure (inside
    ``config.margin``); hosted fakes sit on galaxies chosen from ``hosts`` (a source catalog of
    the exposure or a Sersic host table, see :mod:`apqa.injection.hosts`) by brightness and
    extendedness, at offsets drawn from each host's profile. Everything is a function of
    ``seed``.

    Returns
    -------
    DataFrame
        ``ra``/``dec`` when the exposure has a WCS (``x``/``y`` otherwise) and every other
        catalog column; valid for :func:`validate_catalog`.

    Examples
    --------
    >>> import numpy as np
    >>> from apqa.datamodel import Exposure
    >>> exp = Exposure(np.zeros((200, 300)), np.ones((200, 300)))
    >>> cat = generate_catalog(exp, CatalogConfig(n=5, mix={"isolated": 1}), seed=1)
    >>> list(cat["kind"]), bool(cat["x"].between(20, 279).all())
    (['point', 'point', 'point', 'point', 'point'], True)
    """
    config = config or CatalogConfig()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A1C]))
    n = config.n
    if config.density is not None:
        n = round(config.density * exposure_area_deg2(exposure))
    counts = _allocate(n, config.mix)
    classes = np.concatenate([np.full(k, c, dtype=object) for c, k in counts.items()]
                             or [np.zeros(0, object)])
    table = pd.DataFrame({
        "injection_id": np.arange(config.id_start, config.id_start + n, dtype=np.int64),
        "kind": [CLASS_KIND[c] for c in classes], "fake_class": classes,
        "target": [CLASS_TARGET.get(c, "science") for c in classes],
        "mag": _uniform(rng, config.mag_range, n),
        "template_mag": np.full(n, np.nan),
        "host_id": np.full(n, -1, np.int64), "host_sb": np.full(n, np.nan),
    })
    from scipy.stats import qmc  # here: scipy.stats takes 0.4 s to import

    halton = qmc.Halton(d=2, scramble=True, rng=rng).random(n) if n else np.zeros((0, 2))
    m = config.margin
    x = m + halton[:, 0] * max(exposure.width - 1 - 2 * m, 0.0)
    y = m + halton[:, 1] * max(exposure.height - 1 - 2 * m, 0.0)
    if exposure.wcs is not None:
        table["ra"], table["dec"] = exposure.pixel_to_sky(x, y)
    else:
        table["x"], table["y"] = x, y
    _add_hosted(table, exposure, config, hosts, rng)
    _add_shapes(table, exposure, config, rng)
    return validate_catalog(table, source="generated catalog")


def _add_hosted(table: pd.DataFrame, exposure: Exposure, config: CatalogConfig,
                hosts: pd.DataFrame | None, rng: np.random.Generator) -> None:
    hosted = (table["fake_class"] == "hosted").to_numpy()
    if not hosted.any():
        return
    if hosts is None or exposure.wcs is None:
        raise InputError("hosted fakes need an exposure with a WCS and a host table or source "
                         "catalog (--hosts)")
    chosen_from = select_hosts(hosts, exposure, config.host_mag, config.host_min_extendedness,
                               config.margin)
    if chosen_from.empty:
        raise InputError(
            f"hosts: no galaxy with {config.host_mag[0]} <= mag <= {config.host_mag[1]} and "
            f"extendedness >= {config.host_min_extendedness} inside the exposure")
    # Each host takes one fake while hosts last (two fakes on one galaxy blend into one
    # DIASource and ruin both measurements); more fakes than hosts go round them again.
    n_hosted, n_hosts = int(hosted.sum()), len(chosen_from)
    if n_hosted > n_hosts:
        log.warning("hosted fakes: %d fakes for %d suitable hosts; hosts are reused, so some "
                    "fakes share a galaxy", n_hosted, n_hosts)
    order = np.concatenate([rng.permutation(n_hosts)
                            for _ in range(-(-n_hosted // n_hosts))])[:n_hosted]
    chosen = chosen_from.iloc[order]
    du, dv = sample_offsets(chosen, rng)
    cosd = np.cos(np.deg2rad(chosen["dec"].to_numpy()))
    table.loc[hosted, "ra"] = chosen["ra"].to_numpy() - du / 3600.0 / cosd  # +u is west
    table.loc[hosted, "dec"] = chosen["dec"].to_numpy() + dv / 3600.0
    table.loc[hosted, "host_id"] = chosen["host_id"].to_numpy()
    table.loc[hosted, "host_sb"] = surface_brightness(chosen, du, dv)


def _add_shapes(table: pd.DataFrame, exposure: Exposure, config: CatalogConfig,
                rng: np.random.Generator) -> None:
    n = len(table)
    cls = table["fake_class"].to_numpy()
    sersic, trail, stamp, variable = (cls == c for c in ("sersic", "trail", "stamp", "variable"))
    for name in ("n", "half_light_radius", "q", "beta", "trail_length", "trail_angle"):
        table[name] = np.nan
    k = int(sersic.sum())
    table.loc[sersic, "n"] = _uniform(rng, config.sersic_n, k)
    table.loc[sersic, "half_light_radius"] = _uniform(rng, config.sersic_hlr, k)
    table.loc[sersic, "q"] = _uniform(rng, config.sersic_q, k)
    table.loc[sersic, "beta"] = rng.uniform(0.0, 180.0, k)
    if trail.any():
        exptime = config.exposure_time or (exposure.visit_info.exposure_time
                                           if exposure.visit_info else 0.0)
        if not exptime or exptime <= 0:
            raise InputError("trail fakes need an exposure time: the exposure has none; "
                             "set exposure_time in the catalog configuration")
        rate = _uniform(rng, config.trail_rate, int(trail.sum()))
        table.loc[trail, "trail_length"] = rate * _ARCSEC_PER_S_PER_DEG_PER_DAY * exptime
        table.loc[trail, "trail_angle"] = rng.uniform(0.0, 180.0, int(trail.sum()))
    if variable.any():
        dmag = _uniform(rng, config.variable_dmag, int(variable.sum()))
        sign = np.where(rng.random(int(variable.sum())) < 0.5, -1.0, 1.0)
        table.loc[variable, "template_mag"] = table.loc[variable, "mag"] + sign * dmag
    table["stamp"] = pd.Series([None] * n, dtype=object)
    if stamp.any():
        if not config.stamps:
            raise InputError("stamp fakes need at least one postage stamp (--stamp FILE)")
        picks = rng.integers(0, len(config.stamps), int(stamp.sum()))
        table.loc[stamp, "stamp"] = [str(config.stamps[i]) for i in picks]


# ---------------------------------------------------------------------------------------------
# Validation and I/O


def _row_label(table: pd.DataFrame, row: int) -> str:
    ident = table["injection_id"].iloc[row] if "injection_id" in table else None
    return f"row {row}" + (f" (injection_id {ident})" if ident is not None else "")


def _first_bad(table: pd.DataFrame, bad: np.ndarray, column: str, expected: str,
               source: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = table[column].iloc[row]
        value = value.item() if isinstance(value, np.generic) else value
        raise InputError(f"{source}: column '{column}', {_row_label(table, row)}: got "
                         f"{value!r}; expected {expected} "
                         f"({int(bad.sum())} bad rows)")


def _numeric(table: pd.DataFrame, column: str, source: str) -> np.ndarray:
    values = pd.to_numeric(table[column], errors="coerce")
    _first_bad(table, values.isna().to_numpy() & table[column].notna().to_numpy(), column,
               "a number", source)
    return values.to_numpy(np.float64)


def validate_catalog(table: pd.DataFrame, source: str = "catalog",
                     base_dir: str | Path | None = None) -> pd.DataFrame:
    """Check an injection catalog and return it with normalized dtypes and defaults.

    Missing optional columns get defaults (``fake_class`` from the kind, ``target`` science,
    ``template_mag``/``host_sb`` NaN, ``host_id`` -1). Relative ``stamp`` paths are resolved
    against ``base_dir``. Any problem raises :class:`~apqa.errors.InputError` naming
    ``source``, the column, the first bad row and what was expected.
    """
    table = table.reset_index(drop=True).copy()
    missing = [c for c in ("injection_id", "kind", "mag") if c not in table]
    has_sky, has_pix = {"ra", "dec"} <= set(table), {"x", "y"} <= set(table)
    if not (has_sky or has_pix):
        missing.append("ra and dec (or x and y)")
    if missing:
        raise InputError(f"{source}: missing columns {missing}; got {sorted(table.columns)}")
    ids = _numeric(table, "injection_id", source)
    _first_bad(table, ~np.isfinite(ids) | (ids != np.round(ids)), "injection_id",
               "an integer", source)
    table["injection_id"] = ids.astype(np.int64)
    _first_bad(table, table["injection_id"].duplicated().to_numpy(), "injection_id",
               "unique values", source)
    kind = table["kind"].astype(str).to_numpy()
    _first_bad(table, ~np.isin(kind, KINDS), "kind", f"one of {', '.join(KINDS)}", source)
    table["kind"] = kind
    table["mag"] = _numeric(table, "mag", source)
    _first_bad(table, ~np.isfinite(table["mag"].to_numpy()), "mag", "a finite AB magnitude",
               source)
    if has_sky:
        ra, dec = _numeric(table, "ra", source), _numeric(table, "dec", source)
        _first_bad(table, ~((ra >= 0) & (ra < 360)), "ra", "degrees in [0, 360)", source)
        _first_bad(table, ~((dec >= -90) & (dec <= 90)), "dec", "degrees in [-90, 90]", source)
        table["ra"], table["dec"] = ra, dec
    else:
        for col in ("x", "y"):
            table[col] = _numeric(table, col, source)
            _first_bad(table, ~np.isfinite(table[col].to_numpy()), col, "finite pixels", source)
    _validate_shapes(table, kind, source, base_dir)
    return _defaults(table, kind, source)


def _validate_shapes(table: pd.DataFrame, kind: np.ndarray, source: str,
                     base_dir: str | Path | None) -> None:
    checks = {
        "n": (lambda v: (v >= SERSIC_N_RANGE[0]) & (v <= SERSIC_N_RANGE[1]),
              f"a Sersic index in [{SERSIC_N_RANGE[0]}, {SERSIC_N_RANGE[1]}]"),
        "half_light_radius": (lambda v: v > 0, "arcsec > 0"),
        "q": (lambda v: (v > 0) & (v <= 1), "an axis ratio in (0, 1]"),
        "beta": (np.isfinite, "a finite angle in degrees"),
        "trail_length": (lambda v: v >= 0, "arcsec >= 0"),
        "trail_angle": (np.isfinite, "a finite angle in degrees"),
    }
    for k, columns in SHAPE_COLUMNS.items():
        rows = kind == k
        if not rows.any():
            continue
        absent = [c for c in columns if c not in table]
        if absent:
            raise InputError(f"{source}: kind '{k}' needs columns {absent}")
        for col in columns:
            if col == "stamp":
                continue
            values = _numeric(table, col, source)
            ok, expected = checks[col]
            with np.errstate(invalid="ignore"):
                _first_bad(table, rows & ~(np.isfinite(values) & ok(values)), col, expected,
                           source)
            table[col] = values
    if (kind == "stamp").any():
        paths = []
        for row, value in enumerate(table["stamp"]):
            if kind[row] != "stamp":
                paths.append(None if pd.isna(value) else value)
                continue
            path = Path(str(value)) if isinstance(value, (str, Path)) and str(value) else None
            if path is not None and not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if path is None or not path.is_file():
                raise InputError(f"{source}: column 'stamp', {_row_label(table, row)}: got "
                                 f"{value!r}; expected the path of an existing FITS file")
            paths.append(str(path))
        table["stamp"] = pd.Series(paths, dtype=object)


def _defaults(table: pd.DataFrame, kind: np.ndarray, source: str) -> pd.DataFrame:
    if "fake_class" not in table:
        table["fake_class"] = np.where(kind == "point", "isolated", kind).astype(object)
    _first_bad(table, ~table["fake_class"].isin(FAKE_CLASSES).to_numpy(), "fake_class",
               f"one of {', '.join(FAKE_CLASSES)}", source)
    if "target" not in table:
        table["target"] = "science"
    _first_bad(table, ~table["target"].isin(TARGETS).to_numpy(), "target",
               f"one of {', '.join(TARGETS)}", source)
    for col in ("template_mag", "host_sb"):
        table[col] = _numeric(table, col, source) if col in table else np.nan
    table["host_id"] = (pd.to_numeric(table["host_id"]).fillna(-1).astype(np.int64)
                        if "host_id" in table else np.int64(-1))
    return table


def read_catalog(path: str | Path) -> pd.DataFrame:
    """Read and validate a Parquet injection catalog (stamp paths relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: catalog file not found")
    try:
        table = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise InputError(f"{path}: not a readable Parquet table ({exc})") from None
    return validate_catalog(table, source=str(path), base_dir=path.parent)


def write_catalog(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a catalog as Parquet atomically (no partial file under the final name)."""
    return write_parquet(table, path)

