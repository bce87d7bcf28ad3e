"""HeaderWcs: a header's WCS parsed on first use, standing in for the astropy WCS it describes."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apqa.datamodel import Exposure
from apqa.datamodel.fits_plain import read_wcs
from apqa.datamodel.header_wcs import HeaderWcs, as_wcs
from apqa.errors import InputError


def _header(crpix1: float = 100.5, date: str = "2024-01-02T03:04:05", sip: bool = True
            ) -> fits.Header:
    header = fits.Header({
        "CTYPE1": "RA---TAN-SIP" if sip else "RA---TAN",
        "CTYPE2": "DEC--TAN-SIP" if sip else "DEC--TAN",
        "CRVAL1": 150.1, "CRVAL2": 2.2, "CRPIX1": crpix1, "CRPIX2": 80.25,
        "CD1_1": -7.1e-5, "CD1_2": 3e-7, "CD2_1": 2e-7, "CD2_2": 7.2e-5,
        "DATE-OBS": date, "GAIN": 4.0, "EXPTIME": 30.0})
    if sip:
        header.update({"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 2e-6, "A_0_2": -1e-6,
                       "B_1_1": 3e-6, "B_0_2": 1e-6})
    return header


def _pixels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.uniform(-5, 250, 50), rng.uniform(-5, 180, 50)


def test_stands_in_for_the_parsed_wcs_and_parses_only_when_used():
    header = _header()
    lazy = HeaderWcs(header, "new.fits")
    assert lazy.has_celestial and not lazy.resolved  # from the CTYPE cards
    x, y = _pixels()
    expected = WCS(header, naxis=2).all_pix2world(x, y, 0)
    np.testing.assert_array_equal(lazy.all_pix2world(x, y, 0), expected)
    assert lazy.resolved and isinstance(as_wcs(lazy), WCS)
    assert lazy.sip is not None and lazy.pixel_scale_matrix.shape == (2, 2)
    with pytest.raises(AttributeError):
        lazy.no_such_attribute  # noqa: B018


def test_copies_and_pickles_without_parsing():
    lazy = HeaderWcs(_header(), "new.fits")
    for twin in (copy.deepcopy(lazy), lazy.deepcopy(), pickle.loads(pickle.dumps(lazy))):
        assert not twin.resolved and twin.same_mapping(lazy)
        assert twin.header is not lazy.header
    assert not lazy.resolved
    exposure = Exposure(np.zeros((4, 4)), np.ones((4, 4)), wcs=lazy).copy()
    assert isinstance(exposure.wcs, HeaderWcs) and not exposure.wcs.resolved


def test_same_mapping_compares_only_the_mapping_cards():
    lazy = HeaderWcs(_header(), "a.fits")
    assert lazy.same_mapping(HeaderWcs(_header(date="2025-06-07T00:00:00"), "b.fits"))
    assert not lazy.same_mapping(HeaderWcs(_header(crpix1=100.75), "b.fits"))
    assert not lazy.same_mapping(HeaderWcs(_header(sip=False), "b.fits"))
    assert not lazy.same_mapping(lazy.resolve())  # a parsed WCS is compared by the caller
    table = _header()
    table["CPDIS1"] = "LOOKUP"  # distortion held in another HDU: never judged by the cards
    assert not HeaderWcs(table, "a.fits").same_mapping(HeaderWcs(table.copy(), "b.fits"))


def test_written_cards_read_back_to_the_same_mapping(tmp_path):
    header = _header()
    exposure = Exposure(np.zeros((180, 250)), np.ones((180, 250)),
                        wcs=HeaderWcs(header, "new.fits"))
    exposure.write_fits(tmp_path / "e.fits")
    assert not exposure.wcs.resolved  # written from the cards as read
    written = fits.getheader(tmp_path / "e.fits", "IMAGE")
    assert "GAIN" not in written and written["A_2_0"] == header["A_2_0"]
    back = Exposure.from_fits(tmp_path / "e.fits")
    x, y = _pixels()
    np.testing.assert_allclose(back.wcs.all_pix2world(x, y, 0),
                               WCS(header, naxis=2).all_pix2world(x, y, 0), rtol=0, atol=1e-12)


def test_deferred_reading_falls_back_to_parsing_for_what_the_cards_do_not_say():
    header = _header()
    assert isinstance(read_wcs(header, "a.fits", required=True, defer=True), HeaderWcs)
    linear = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CRVAL1": 0.0,
                          "CRVAL2": 0.0, "CRPIX1": 1.0, "CRPIX2": 1.0})
    with pytest.raises(InputError, match=r"a\.fits: header has no celestial WCS"):
        read_wcs(linear, "a.fits", required=True, defer=True)
    assert read_wcs(fits.Header(), "a.fits", required=False, defer=True) is None
    for ctypes in (("RA---XYZ", "DEC--XYZ"), ("RA---TAN", "DEC--SIN")):
        broken = _header(sip=False)
        broken["CTYPE1"], broken["CTYPE2"] = ctypes  # an unknown or inconsistent projection
        with pytest.raises(InputError, match=r"a\.fits: header WCS could not be parsed"):
            read_wcs(broken, "a.fits", required=True, defer=True)
    for ctypes in (("DEC--TAN", "RA---TAN"), ("GLON-CAR", "GLAT-CAR"), ("RA---TPV", "DEC--TPV")):
        header = _header(sip=False)
        header["CTYPE1"], header["CTYPE2"] = ctypes
        assert HeaderWcs(header, "a.fits").looks_celestial(), ctypes
