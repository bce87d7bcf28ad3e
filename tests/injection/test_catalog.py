"""Injection catalogs: generation (positions, kinds, hosts), validation errors, Parquet I/O."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import gammaincinv

from apqa.errors import ConfigError, InputError
from apqa.injection.catalog import (
    CatalogConfig,
    exposure_area_deg2,
    generate_catalog,
    read_catalog,
    validate_catalog,
    write_catalog,
)
from apqa.injection.hosts import select_hosts, surface_brightness

from .conftest import SCALE, make_exposure

ALL = {"isolated": 0.3, "hosted": 0.2, "variable": 0.1, "negative": 0.1, "trail": 0.1,
       "sersic": 0.1, "stamp": 0.1}


@pytest.fixture
def hosts_table():
    """Galaxies and a star near the centre of a make_exposure() field (ra/dec of its WCS)."""
    exposure = make_exposure()
    ra, dec = exposure.pixel_to_sky(np.array([300.0, 700.0, 500.0, 500.0]),
                                    np.array([500.0, 1500.0, 1000.0, 200.0]))
    return pd.DataFrame({
        "object_id": [11, 12, 13, 14], "kind": ["galaxy", "galaxy", "galaxy", "star"],
        "ra": ra, "dec": dec, "mag": [20.0, 21.5, 26.0, 18.0], "sersic_n": [1.0, 4.0, 1.0, 1.0],
        "half_light_radius": [2.0, 1.0, 0.5, 1.0], "q": [0.5, 0.8, 0.9, 1.0],
        "beta": [30.0, 120.0, 0.0, 0.0]})


def test_generate_all_classes(tmp_path, hosts_table):
    stamp = tmp_path / "s.fits"
    stamp.write_bytes(b"")  # existence is what the catalog checks; drawing reads it later
    exposure = make_exposure()
    config = CatalogConfig(n=400, mix=ALL, mag_range=(21.0, 24.0), stamps=[str(stamp)])
    cat = generate_catalog(exposure, config, hosts=hosts_table, seed=4)
    counts = cat["fake_class"].value_counts().to_dict()
    assert counts == {"isolated": 120, "hosted": 80, "variable": 40, "negative": 40,
                      "trail": 40, "sersic": 40, "stamp": 40}
    assert cat["injection_id"].tolist() == list(range(400))
    kinds = dict(zip(cat["fake_class"], cat["kind"], strict=True))
    assert kinds == {"isolated": "point", "hosted": "point", "variable": "point",
                     "negative": "point", "trail": "trail", "sersic": "sersic",
                     "stamp": "stamp"}
    targets = cat.groupby("fake_class")["target"].unique().map(list).to_dict()
    assert targets["variable"] == ["both"] and targets["negative"] == ["template"]
    assert targets["isolated"] == ["science"]
    assert cat["mag"].between(21.0, 24.0).all()
    x, y = exposure.sky_to_pixel(cat["ra"], cat["dec"])
    unhosted = (cat["fake_class"] != "hosted").to_numpy()
    assert ((x[unhosted] >= 20) & (x[unhosted] <= 1003) & (y[unhosted] >= 20)
            & (y[unhosted] <= 2027)).all()
    var = cat[cat["fake_class"] == "variable"]
    assert (var["template_mag"] - var["mag"]).abs().between(0.3, 1.5).all()
    assert cat.loc[cat["fake_class"] != "variable", "template_mag"].isna().all()
    trail = cat[cat["kind"] == "trail"]
    # length = rate (0.5-10 deg/day) x exposure time (30 s)
    assert trail["trail_length"].between(0.5 * 30 / 24, 10 * 30 / 24).all()
    sersic = cat[cat["kind"] == "sersic"]
    assert sersic["n"].between(0.5, 4.0).all() and sersic["q"].between(0.3, 1.0).all()
    assert (cat.loc[cat["kind"] == "stamp", "stamp"] == str(stamp)).all()
    # Hosted fakes sit on the two bright galaxies only (not the faint one, not the star).
    hosted = cat[cat["fake_class"] == "hosted"]
    assert set(hosted["host_id"]) == {11, 12}
    assert hosted["host_sb"].notna().all()
    assert (cat.loc[~cat["fake_class"].eq("hosted"), "host_id"] == -1).all()


def test_generation_is_seeded_and_halton_spread():
    exposure = make_exposure()
    a = generate_catalog(exposure, CatalogConfig(n=256), seed=1)
    b = generate_catalog(exposure, CatalogConfig(n=256), seed=1)
    c = generate_catalog(exposure, CatalogConfig(n=256), seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["ra"], c["ra"])
    # Low discrepancy: each of 16 equal cells holds 16 +- 3 points (random would scatter +- 4).
    x, y = exposure.sky_to_pixel(a["ra"], a["dec"])
    cells = np.histogram2d(x, y, bins=4, range=[[20, 1003], [20, 2027]])[0]
    assert np.abs(cells - 16).max() <= 3


def test_density_uses_the_sky_area():
    exposure = make_exposure()
    area = exposure_area_deg2(exposure)
    assert area == pytest.approx(1024 * 2048 * (SCALE / 3600) ** 2, rel=1e-6)
    cat = generate_catalog(exposure, CatalogConfig(density=50_000.0), seed=0)
    assert len(cat) == round(50_000 * area)


def test_hosted_offsets_follow_the_host_profile():
    exposure = make_exposure()
    ra, dec = exposure.pixel_to_sky(np.array([512.0]), np.array([1024.0]))
    host = pd.DataFrame({"object_id": [5], "ra": ra, "dec": dec, "mag": [19.0],
                         "sersic_n": [2.0], "half_light_radius": [1.5], "q": [0.5],
                         "beta": [0.0]})
    cat = generate_catalog(exposure, CatalogConfig(n=4000, mix={"hosted": 1}), hosts=host,
                           seed=9)
    du = -(cat["ra"] - ra[0]) * np.cos(np.deg2rad(dec[0])) * 3600  # +u is west
    dv = (cat["dec"] - dec[0]) * 3600
    # Elliptical radius (q = 0.5 along u): half the light lies within the half-light radius.
    radius = np.hypot(du * np.sqrt(0.5), dv / np.sqrt(0.5))
    assert np.median(radius) == pytest.approx(1.5, rel=0.04)
    assert (du**2).mean() / (dv**2).mean() == pytest.approx(4.0, rel=0.1)  # a/b = 1/q
    # Surface brightness at the centre-most fake versus the analytic Sersic profile.
    b = gammaincinv(4.0, 0.5)
    flux = 10 ** (-0.4 * (19.0 - 31.4))
    k = int(np.argmin(radius))
    intensity = flux * b**4 * np.exp(-b * (radius[k] / 1.5) ** 0.5) / (
        2 * np.pi * 2 * 1.5**2 * 6.0)  # Gamma(4) = 6
    assert cat["host_sb"].iloc[k] == pytest.approx(31.4 - 2.5 * np.log10(intensity), abs=1e-6)
    assert cat["host_sb"].iloc[k] < np.median(cat["host_sb"])


def test_hosts_from_a_source_catalog():
    """Measured moments minus the PSF's, mapped to the sky, give the host's size and shape."""
    exposure = make_exposure()
    psf_sigma2 = (exposure.psf.fwhm / 2.3548) ** 2
    h, q, beta = 1.0 / SCALE, 0.5, 30.0  # exponential scale length in px
    a2, b2 = 3 * (h / np.sqrt(q)) ** 2, 3 * (h * np.sqrt(q)) ** 2
    c, s = np.cos(np.deg2rad(beta)), np.sin(np.deg2rad(beta))
    # With north up and east left, +x is +u (west) and +y is +v (north).
    ixx = a2 * c * c + b2 * s * s + psf_sigma2
    iyy = a2 * s * s + b2 * c * c + psf_sigma2
    ixy = (a2 - b2) * c * s
    x, y = np.array([400.0, 600.0]), np.array([900.0, 1100.0])
    ra, dec = exposure.pixel_to_sky(x, y)
    sources = pd.DataFrame({"sourceId": [7, 8], "x": x, "y": y, "ra": ra, "dec": dec,
                            "ixx": [ixx, psf_sigma2], "iyy": [iyy, psf_sigma2],
                            "ixy": [ixy, 0.0], "apFlux": [10 ** (-0.4 * (20 - 31.4))] * 2,
                            "extendedness": [1.0, 0.0]})
    hosts = select_hosts(sources, exposure, (17.0, 23.0))
    assert hosts["host_id"].tolist() == [7]  # the point source is not a host
    row = hosts.iloc[0]
    assert row["mag"] == pytest.approx(20.0)
    assert row["re"] == pytest.approx(gammaincinv(2.0, 0.5) * 1.0, rel=1e-3)
    assert row["q"] == pytest.approx(q, rel=1e-3)
    assert row["beta"] == pytest.approx(beta, abs=0.1)
    assert surface_brightness(hosts, np.zeros(1), np.zeros(1))[0] == pytest.approx(
        31.4 - 2.5 * np.log10(10 ** (-0.4 * (20 - 31.4)) / (2 * np.pi * 1.0**2)), abs=1e-6)


def test_hosts_from_the_simulated_field(hits_sim, hits_exposure):
    """Real galaxies of a simulated field (its truth table) host the hosted fakes."""
    objects = hits_sim.sky.objects_table().reset_index(drop=True)
    exposure = hits_exposure.raw
    cat = generate_catalog(exposure, CatalogConfig(n=60, mix={"hosted": 1},
                                                   host_mag=(19.0, 22.0)),
                           hosts=objects, seed=3)
    chosen = objects.set_index("object_id").loc[cat["host_id"]]
    assert (chosen["kind"] == "galaxy").all()
    assert chosen["mag"].between(19.0, 22.0).all()
    x, y = exposure.sky_to_pixel(chosen["ra"], chosen["dec"])
    assert ((x >= 20) & (x <= exposure.width - 21) & (y >= 20)
            & (y <= exposure.height - 21)).all()
    sep = np.hypot((cat["ra"].to_numpy() - chosen["ra"].to_numpy())
                   * np.cos(np.deg2rad(chosen["dec"].to_numpy())),
                   cat["dec"].to_numpy() - chosen["dec"].to_numpy()) * 3600
    assert np.median(sep / chosen["half_light_radius"].to_numpy()) < 2.0


def test_generation_errors():
    exposure = make_exposure()
    with pytest.raises(InputError, match=r"hosted fakes need .* host table"):
        generate_catalog(exposure, CatalogConfig(mix={"hosted": 1}))
    with pytest.raises(InputError, match="stamp fakes need at least one postage stamp"):
        generate_catalog(exposure, CatalogConfig(mix={"stamp": 1}))
    with pytest.raises(ValueError, match="unknown fake classes"):
        CatalogConfig(mix={"supernova": 1.0})
    from apqa.config import config_from_mapping

    with pytest.raises(ConfigError, match="mag_range"):
        config_from_mapping(CatalogConfig, {"mag_range": [25, 20]}, "cfg.yaml")


def _good():
    return pd.DataFrame({"injection_id": [3, 4, 5], "kind": ["point", "sersic", "trail"],
                         "ra": [150.0, 150.001, 150.002], "dec": [2.0, 2.0, 2.0],
                         "mag": [21.0, 22.0, 23.0], "n": [np.nan, 1.0, np.nan],
                         "half_light_radius": [np.nan, 0.7, np.nan], "q": [np.nan, 0.6, np.nan],
                         "beta": [np.nan, 10.0, np.nan], "trail_length": [np.nan, np.nan, 4.0],
                         "trail_angle": [np.nan, np.nan, 45.0]})


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.assign(kind=["point", "galaxy", "trail"]),
     "cat.parquet: column 'kind', row 1 (injection_id 4): got 'galaxy'; expected one of "
     "point, sersic, trail, stamp (1 bad rows)"),
    (lambda t: t.assign(mag=[21.0, np.nan, 23.0]),
     "cat.parquet: column 'mag', row 1 (injection_id 4): got nan; expected a finite AB "
     "magnitude (1 bad rows)"),
    (lambda t: t.assign(mag=["21", "bright", "23"]),
     "cat.parquet: column 'mag', row 1 (injection_id 4): got 'bright'; expected a number "
     "(1 bad rows)"),
    (lambda t: t.assign(injection_id=[3, 3, 5]),
     "cat.parquet: column 'injection_id', row 1 (injection_id 3): got 3; expected unique "
     "values (1 bad rows)"),
    (lambda t: t.assign(n=[np.nan, 8.0, np.nan]),
     "cat.parquet: column 'n', row 1 (injection_id 4): got 8.0; expected a Sersic index in "
     "[0.3, 6.2] (1 bad rows)"),
    (lambda t: t.assign(q=[np.nan, 1.5, np.nan]),
     "cat.parquet: column 'q', row 1 (injection_id 4): got 1.5; expected an axis ratio in "
     "(0, 1] (1 bad rows)"),
    (lambda t: t.assign(trail_length=[np.nan, np.nan, -1.0]),
     "cat.parquet: column 'trail_length', row 2 (injection_id 5): got -1.0; expected "
     "arcsec >= 0 (1 bad rows)"),
    (lambda t: t.assign(dec=[2.0, 95.0, 2.0]),
     "cat.parquet: column 'dec', row 1 (injection_id 4): got 95.0; expected degrees in "
     "[-90, 90] (1 bad rows)"),
    (lambda t: t.drop(columns=["ra"]),
     "cat.parquet: missing columns ['ra and dec (or x and y)']; got ['beta', 'dec', "
     "'half_light_radius', 'injection_id', 'kind', 'mag', 'n', 'q', 'trail_angle', "
     "'trail_length']"),
    (lambda t: t.drop(columns=["trail_angle"]),
     "cat.parquet: kind 'trail' needs columns ['trail_angle']"),
    (lambda t: t.assign(kind=["point", "sersic", "stamp"], stamp=[None, None, "nope.fits"]),
     "cat.parquet: column 'stamp', row 2 (injection_id 5): got 'nope.fits'; expected the "
     "path of an existing FITS file"),
    (lambda t: t.assign(target=["science", "coadd", "both"]),
     "cat.parquet: column 'target', row 1 (injection_id 4): got 'coadd'; expected one of "
     "science, template, both (1 bad rows)"),
])
def test_validation_errors_name_file_column_row(tmp_path, change, message):
    path = tmp_path / "cat.parquet"
    write_catalog(change(_good()), path)
    with pytest.raises(InputError) as err:
        read_catalog(path)
    assert str(err.value) == message.replace("cat.parquet", str(path))


def test_round_trip_and_defaults(tmp_path):
    path = write_catalog(_good(), tmp_path / "c.parquet")
    cat = read_catalog(path)
    assert cat["fake_class"].tolist() == ["isolated", "sersic", "trail"]
    assert cat["target"].tolist() == ["science"] * 3
    assert cat["host_id"].tolist() == [-1] * 3
    assert cat["injection_id"].dtype == np.int64
    # Relative stamp paths resolve against the catalog's folder.
    (tmp_path / "g.fits").write_bytes(b"")
    stamp = _good().assign(kind=["point", "sersic", "stamp"], stamp=[None, None, "g.fits"])
    cat = read_catalog(write_catalog(stamp, tmp_path / "s.parquet"))
    assert cat["stamp"].iloc[2] == str(tmp_path / "g.fits")
    with pytest.raises(InputError, match="catalog file not found"):
        read_catalog(tmp_path / "missing.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet table"):
        read_catalog(tmp_path / "bad.parquet")
    assert validate_catalog(_good()).equals(validate_catalog(_good()))


@pytest.mark.slow
def test_hosts_from_processed_sources_are_real_galaxies(processed_hits):
    """Hosts picked from ``apqa process`` sources by extendedness are the field's galaxies."""
    sim, truth, result = processed_hits
    cat = generate_catalog(result.calexp, CatalogConfig(n=100, mix={"hosted": 1},
                                                        host_mag=(18.0, 22.0)),
                           hosts=result.sources, seed=2)
    hosts = result.sources.set_index("sourceId").loc[cat["host_id"].unique()]
    assert (hosts["extendedness"] >= 0.5).all()
    objects = truth.truth_sources
    tx, ty = objects["x"].to_numpy(), objects["y"].to_numpy()
    nearest = [int(np.argmin(np.hypot(tx - x, ty - y)))
               for x, y in zip(hosts["x"], hosts["y"], strict=True)]
    kinds = objects["kind"].to_numpy()[nearest]
    assert (kinds == "galaxy").mean() >= 0.9
    # Their sizes follow the truth: median measured re / true half-light radius near 1.
    gal = sim.sky.galaxies.set_index("object_id")
    true_hlr = gal.loc[objects["object_id"].to_numpy()[nearest][kinds == "galaxy"],
                       "half_light_radius"].to_numpy()
    chosen = select_hosts(result.sources, result.calexp, (18.0, 22.0)).set_index("host_id")
    measured = chosen.loc[hosts.index[kinds == "galaxy"], "re"].to_numpy()
    assert 0.5 < np.median(measured / true_hlr) < 1.5
