"""Reference catalogues: readers, defaults, bad input, fluxes and epoch propagation vs truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from apqa.datamodel.photocalib import abmag_to_njy
from apqa.errors import InputError
from apqa.pipeline.refcat import (
    MJD_J2016,
    load_refcat,
    position_error_at_epoch,
    propagate_to_epoch,
    reference_flux,
)

GAIA_COLUMNS = ["ra", "dec", "ra_error", "dec_error", "pmra", "pmdec", "parallax", "ref_epoch"]


def _sep_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    cosd = np.cos(np.deg2rad(np.asarray(dec2)))
    return np.hypot((np.asarray(ra1) - np.asarray(ra2)) * cosd,
                    np.asarray(dec1) - np.asarray(dec2)) * 3.6e6


@pytest.fixture(scope="module")
def refcat(hits_sim) -> pd.DataFrame:
    return hits_sim.refcat


def test_parquet_round_trip(tmp_path, refcat):
    path = tmp_path / "refcat.parquet"
    refcat.to_parquet(path)
    cat = load_refcat(path)
    assert len(cat) == len(refcat)
    for column in GAIA_COLUMNS:
        assert cat[column].dtype == np.float64
        np.testing.assert_allclose(cat[column], refcat[column])
    assert (cat["source_id"] == refcat["source_id"]).all()  # other columns pass through


def test_csv_and_fits_readers(tmp_path, refcat):
    csv = tmp_path / "refcat.csv"
    refcat.to_csv(csv, index=False)
    fits_path = tmp_path / "refcat.fits"
    table = Table.from_pandas(refcat[["source_id", "ra", "dec", "pmra", "pmdec", "g_mag"]])
    table.rename_columns(["ra", "dec"], ["RA", "DEC"])  # Gaia archive FITS are often upper case
    table.write(fits_path)
    from_csv, from_fits = load_refcat(csv), load_refcat(fits_path)
    np.testing.assert_allclose(from_csv["dec"], refcat["dec"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_fits["ra"], refcat["ra"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_fits["pmdec"], refcat["pmdec"])
    # Columns the FITS file lacks get their defaults.
    assert (from_fits["parallax"] == 0).all() and (from_fits["ref_epoch"] == 2016.0).all()
    assert (from_fits["ra_error"] > 0).all()


def test_missing_and_nan_optional_columns_default(tmp_path):
    path = tmp_path / "min.csv"
    pd.DataFrame({"ra": [10.0, 359.5], "dec": [-5.0, 1.0], "pmra": [np.nan, 3.0],
                  "g_flux": [1000.0, 2000.0]}).to_csv(path, index=False)
    cat = load_refcat(path)
    assert cat["pmra"].tolist() == [0.0, 3.0]  # Gaia 2-parameter solutions: NaN proper motion
    assert cat["pmdec"].tolist() == [0.0, 0.0] and cat["parallax"].tolist() == [0.0, 0.0]
    assert cat["ref_epoch"].tolist() == [2016.0, 2016.0]


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.parquet.*not found"):
        load_refcat(tmp_path / "nope.parquet")


def test_missing_ra_column_names_file_and_column(tmp_path):
    path = tmp_path / "no_ra.csv"
    pd.DataFrame({"dec": [1.0], "g_mag": [17.0]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"no_ra\.csv: column 'ra' not found"):
        load_refcat(path)


def test_non_numeric_dec_names_file_column_and_value(tmp_path):
    path = tmp_path / "bad_dec.csv"
    path.write_text("ra,dec\n10.0,1.0\n10.1,north\n")
    with pytest.raises(InputError, match=r"bad_dec\.csv: column 'dec': expected numbers.*'north'"):
        load_refcat(path)


def test_non_numeric_photometry(tmp_path):
    path = tmp_path / "bad_mag.csv"
    path.write_text("ra,dec,g_mag\n10.0,1.0,17.2\n10.1,1.1,bright\n")
    with pytest.raises(InputError, match=r"bad_mag\.csv: column 'g_mag'"):
        load_refcat(path)


def test_nan_ra(tmp_path):
    path = tmp_path / "nan_ra.parquet"
    pd.DataFrame({"ra": [1.0, np.nan], "dec": [0.0, 0.0]}).to_parquet(path)
    with pytest.raises(InputError, match=r"nan_ra\.parquet: column 'ra'.*1 NaN.*row 1"):
        load_refcat(path)


def test_dec_out_of_range(tmp_path):
    path = tmp_path / "dec.csv"
    pd.DataFrame({"ra": [1.0], "dec": [95.0]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"dec\.csv: column 'dec': expected degrees"):
        load_refcat(path)


def test_unreadable_and_unknown_format(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match=r"corrupt\.parquet: cannot read as Parquet"):
        load_refcat(corrupt)
    corrupt_fits = tmp_path / "corrupt.fits"
    corrupt_fits.write_bytes(b"SIMPLE = nonsense")
    with pytest.raises(InputError, match=r"corrupt\.fits: cannot read as FITS"):
        load_refcat(corrupt_fits)
    other = tmp_path / "refcat.xlsx"
    other.write_bytes(b"")
    with pytest.raises(InputError, match=r"refcat\.xlsx: unknown reference catalog format"):
        load_refcat(other)


def test_reference_flux_from_mag_and_flux(refcat):
    flux, err = reference_flux(refcat, "g")
    np.testing.assert_allclose(flux, abmag_to_njy(refcat["g_mag"].to_numpy()))
    np.testing.assert_allclose(err / flux, refcat["g_magErr"] * np.log(10) / 2.5)
    cat = pd.DataFrame({"r_flux": [100.0, 200.0], "r_fluxErr": [1.0, 2.0], "r_mag": [0.0, 0.0]})
    flux, err = reference_flux(cat, "r")  # fluxes win over magnitudes
    assert flux.tolist() == [100.0, 200.0] and err.tolist() == [1.0, 2.0]
    flux, err = reference_flux(pd.DataFrame({"i_flux": [5.0]}), "i")
    assert flux.tolist() == [5.0] and np.isnan(err).all()


def test_reference_flux_missing_band(refcat):
    with pytest.raises(InputError, match=r"gaia\.parquet: band 'y'.*'y_flux'.*'y_mag'"):
        reference_flux(refcat, "y", "gaia.parquet")


def test_proper_motion_and_reference_epoch():
    cat = pd.DataFrame({"ra": [30.0, 30.0], "dec": [60.0, 60.0], "pmra": [100.0, 100.0],
                        "pmdec": [-50.0, -50.0], "parallax": [0.0, 0.0],
                        "ref_epoch": [2016.0, 2015.5]})
    ra, dec = propagate_to_epoch(cat, MJD_J2016 + 2 * 365.25)
    cosd = np.cos(np.deg2rad(60.0))
    assert (ra[0] - 30.0) * cosd * 3.6e6 == pytest.approx(200.0, abs=1e-6)
    assert (dec[0] - 60.0) * 3.6e6 == pytest.approx(-100.0, abs=1e-6)
    assert (ra[1] - 30.0) * cosd * 3.6e6 == pytest.approx(250.0, abs=1e-6)  # 2.5 years


def test_parallax_ellipse_size():
    # A star at the ecliptic pole traces a circle of radius ~parallax over a year.
    cat = pd.DataFrame({"ra": [270.0], "dec": [66.56], "pmra": [0.0], "pmdec": [0.0],
                        "parallax": [1000.0], "ref_epoch": [2016.0]})
    shifts = []
    for day in np.linspace(0, 365, 13):
        ra, dec = propagate_to_epoch(cat, MJD_J2016 + day)
        shifts.append(_sep_mas(ra, dec, cat["ra"], cat["dec"])[0])
    assert 970 < min(shifts) and max(shifts) < 1030


def test_propagation_matches_simulator_truth(hits_sim, hits_exposure):
    """Refcat positions moved to the epoch agree with the truth within the refcat errors."""
    refcat = hits_sim.refcat
    mjd = hits_exposure.raw.visit_info.mjd
    truth = hits_exposure.truth_sources
    stars = truth[truth["kind"] == "star"].set_index("object_id")[["ra", "dec"]]
    ra, dec = propagate_to_epoch(refcat, mjd)
    joined = refcat.assign(ra_epoch=ra, dec_epoch=dec).join(
        stars.rename(columns={"ra": "ra_true", "dec": "dec_true"}), on="source_id", how="inner")
    assert len(joined) >= 30
    sep = _sep_mas(joined["ra_epoch"], joined["dec_epoch"], joined["ra_true"],
                   joined["dec_true"])
    unpropagated = _sep_mas(joined["ra"], joined["dec"], joined["ra_true"], joined["dec_true"])
    bright = joined["g_mag"].to_numpy() < 18
    assert bright.sum() >= 5
    assert np.median(sep[bright]) < 2.0
    # Normalised by the stated errors at the epoch: |r| / sigma of a 2-d Gaussian has median 1.18.
    sigma = position_error_at_epoch(joined, mjd)
    assert 0.7 < np.median(sep / sigma) < 1.8
    assert np.median(unpropagated) > 10 * np.median(sep)


def test_position_error_at_epoch_defaults():
    cat = pd.DataFrame({"ra": [0.0]})
    assert position_error_at_epoch(cat, MJD_J2016 + 3650)[0] == pytest.approx(1.0)
