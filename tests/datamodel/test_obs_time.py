"""MJD in TAI from header times: the leap-second table read directly must agree with
astropy.time everywhere, and hand the cases it does not settle to astropy.time."""

import numpy as np
import pytest
from astropy.time import Time, TimeDelta

from apqa.datamodel.obs_time import LeapSeconds, leap_seconds, mjd_tai, parse_leap_seconds


def _astropy(mjd: float, scale: str, seconds: float = 0.0) -> float:
    start = Time(mjd, format="mjd", scale=scale)
    return float((start + TimeDelta(seconds, format="sec")).tai.mjd)


@pytest.mark.parametrize("scale", ["utc", "tai", "tt", "tdb"])
def test_agrees_with_astropy_from_1972_to_the_table_expiry(scale):
    table = leap_seconds()
    rng = np.random.default_rng(3)
    # Random dates, plus the days around every leap second (the day itself included).
    dates = list(rng.uniform(table.starts[0], table.expires - 1, 300))
    for start in table.starts[1:]:
        dates += [start - 1.5, start - 0.999, start - 0.5, start - 1e-6, start, start + 0.25]
    for mjd in dates:
        assert mjd_tai(mjd, scale, 45.0) == pytest.approx(_astropy(mjd, scale, 45.0),
                                                           abs=2e-11), (scale, mjd)


def test_utc_offset_is_37_s_since_2017():
    assert (mjd_tai(60000.0, "utc") - 60000.0) * 86400 == pytest.approx(37.0, abs=1e-5)
    assert (mjd_tai(57752.5, "utc") - 57752.5) * 86400 == pytest.approx(36.0, abs=1e-5)


def test_dates_the_table_does_not_settle_go_to_astropy():
    # Before 1972 (UTC seconds were not SI seconds then) and past the table's expiry.
    for mjd in (40000.3, 41316.9):
        assert mjd_tai(mjd, "utc", 10.0) == pytest.approx(_astropy(mjd, "utc", 10.0), abs=2e-11)
    stale = LeapSeconds(starts=(41317.0, 57754.0), offsets=(10.0, 37.0), expires=58000.0)
    # Past this (made-up) table's expiry astropy's own table decides: 37 s, not a guess.
    assert (mjd_tai(59000.0, "utc", table=stale) - 59000.0) * 86400 == pytest.approx(37.0,
                                                                                     abs=1e-5)
    # Inside it, the table given is what counts (here deliberately unlike the real one).
    assert (mjd_tai(50000.0, "utc", table=stale) - 50000.0) * 86400 == pytest.approx(10.0,
                                                                                      abs=1e-5)


def test_parse_reads_rows_and_expiry():
    text = """#  File expires on 28 June 2027
#    MJD        Date        TAI-UTC (s)
    41317.0    1  1 1972       10
    57754.0    1  1 2017       37
"""
    table = parse_leap_seconds(text, "Leap_Second.dat")
    assert table.starts == (41317.0, 57754.0)
    assert table.offsets == (10.0, 37.0)
    assert table.expires == Time("2027-06-28", scale="utc").mjd


def test_parse_names_the_file_when_it_is_not_a_table():
    with pytest.raises(ValueError, match=r"broken\.dat: expected an IERS leap-second table"):
        parse_leap_seconds("# nothing here\n", "broken.dat")


def test_reading_a_plain_image_does_not_import_astropy_time(tmp_path):
    """The point of the module: a UTC MJD-OBS is converted without astropy.time (as apqa
    diff reads, the WCS unparsed: astropy.wcs imports astropy.time)."""
    import subprocess
    import sys

    from astropy.io import fits

    path = tmp_path / "p.fits"
    header = fits.Header({"MJD-OBS": 60000.0, "EXPTIME": 30.0, "GAIN": 2.0,
                          "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0,
                          "CRVAL2": 5.0, "CRPIX1": 32.0, "CRPIX2": 32.0,
                          "CDELT1": -5e-5, "CDELT2": 5e-5})
    fits.PrimaryHDU(np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32),
                    header).writeto(path)
    code = ("import sys; from apqa.datamodel import Exposure; "
            f"e = Exposure.from_fits({str(path)!r}, defer_wcs=True); "
            "print(e.visit_info.mjd, 'astropy.time' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert float(out[0]) == pytest.approx(_astropy(60000.0, "utc", 15.0), abs=2e-11)
    assert out[1] == "False"
