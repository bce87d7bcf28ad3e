"""A FITS header's celestial WCS, parsed by astropy only when something first needs it.

``apqa diff`` is timed whole, and importing ``astropy.wcs`` (with the astropy.coordinates
and astropy.table it pulls in) costs it 0.13 s. Two aligned images never need it: their grids
are the same when the cards that define the pixel-to-sky mapping are the same, and the
difference image can carry the science's cards as they were read. :class:`HeaderWcs` keeps
the header and stands in for the :class:`astropy.wcs.WCS` it describes: any attribute asked
of it (``all_pix2world``, ``wcs``, ``sip``, ``to_header`` ...) is the parsed WCS's.

Examples
--------
>>> from astropy.io import fits
>>> header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0,
...                       "CRVAL2": 2.0, "CRPIX1": 50.0, "CRPIX2": 50.0,
...                       "CD1_1": -7e-5, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 7e-5})
>>> wcs = HeaderWcs(header, "new.fits")
>>> wcs.has_celestial, wcs.resolved
(True, False)
>>> ra, dec = wcs.all_pix2world([49.0], [49.0], 0)  # parsed now
>>> round(float(ra[0]), 6), round(float(dec[0]), 6), wcs.resolved
(150.0, 2.0, True)
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import TYPE_CHECKING, Any

from astropy.io import fits

from apqa.errors import InputError

if TYPE_CHECKING:
    from astropy.wcs import WCS

#: Keywords that define the celestial pixel-to-sky mapping of the primary WCS: projection,
#: reference point, linear transformation, projection parameters (TPV too), SIP polynomials.
_MAPPING = re.compile(r"(CTYPE|CUNIT|CRVAL|CRPIX|CDELT|CROTA)[12]|(CD|PC)[12]_[12]|P[VS][12]_\d+"
                      r"|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|WCSAXES"
                      r"|(A|B|AP|BP)_(ORDER|DMAX|\d+_\d+)")
#: Keywords astropy also reads to complete a WCS (the observation's time and place).
_CONTEXT = re.compile(r"(DATE|MJD)-(OBS|BEG|AVG|END)|MJDREF[IF]?|DATEREF|TIMESYS"
                      r"|OBSGEO-[XYZLBH]")
#: Distortion lookup tables live in other HDUs: a header holding them is parsed, not copied.
_LOOKUP_TABLE = re.compile(r"CPDIS|CQDIS|DP[12]|DQ[12]|CPERR|CQERR|D2IM")
#: CTYPEs of celestial longitude and latitude axes (FITS WCS paper II): the coordinate, a
#: projection wcslib knows, optionally SIP or TPV distortion.
_PROJECTION = (r"-(AZP|SZP|TAN|STG|SIN|ARC|ZPN|ZEA|AIR|CYP|CEA|CAR|MER|SFL|PAR|MOL|AIT|COP"
               r"|COE|COD|COO|BON|PCO|TSC|CSC|QSC|HPX|XPH)(-SIP)?|-TPV")
_LONGITUDE = re.compile(rf"(RA--|GLON|ELON|HLON|SLON|[A-Z]{{2}}LN)({_PROJECTION})")
_LATITUDE = re.compile(rf"(DEC-|GLAT|ELAT|HLAT|SLAT|[A-Z]{{2}}LT)({_PROJECTION})")


def parse_wcs(header: fits.Header, source: str) -> WCS:
    """The two-axis WCS of ``header``, parsed by astropy (an :class:`~apqa.errors.InputError`
    naming ``source`` when its cards cannot be parsed)."""
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            return WCS(header, naxis=2)
        except Exception as exc:  # astropy raises many types for malformed WCS cards
            raise InputError(f"{source}: header WCS could not be parsed ({exc})") from None


class HeaderWcs:
    """The celestial WCS of ``header`` (read from ``source``), parsed on first use.

    Parameters
    ----------
    header
        The image's header, as astropy would parse it (kept, not copied).
    source
        Where it was read from, for error messages.
    """

    def __init__(self, header: fits.Header, source: str) -> None:
        self.header = header
        self.source = source
        self._wcs: WCS | None = None

    @property
    def resolved(self) -> bool:
        """Whether the header has been parsed."""
        return self._wcs is not None

    def resolve(self) -> WCS:
        """The parsed :class:`astropy.wcs.WCS` (parsed once)."""
        if self._wcs is None:
            self._wcs = parse_wcs(self.header, self.source)
        return self._wcs

    def looks_celestial(self) -> bool:
        """Whether CTYPE1 and CTYPE2 name a celestial longitude and latitude in the same
        known projection (without parsing; False does not mean that the parsed WCS has no
        celestial axes, only that the cards alone do not settle it)."""
        types = [str(self.header.get(f"CTYPE{i}", "")).upper() for i in (1, 2)]
        pair = [(_LONGITUDE.fullmatch(t), _LATITUDE.fullmatch(t)) for t in types]
        if pair[0][0] and pair[1][1]:
            lon, lat = types
        elif pair[0][1] and pair[1][0]:
            lat, lon = types
        else:
            return False
        return lon[4:] == lat[4:]  # one projection for both axes

    @property
    def has_celestial(self) -> bool:
        """RA/Dec-like axes: from the CTYPE cards while unparsed when they say so plainly."""
        if self._wcs is None and self.looks_celestial():
            return True
        return bool(self.resolve().has_celestial)

    def mapping_cards(self) -> dict[str, Any] | None:
        """The cards that define the pixel-to-sky mapping, or None when the header refers to
        distortion tables elsewhere (then only the parsed WCS says what the mapping is)."""
        if any(_LOOKUP_TABLE.match(key) for key in self.header):
            return None
        return {key: self.header[key] for key in self.header if _MAPPING.fullmatch(key)}

    def same_mapping(self, other: object) -> bool:
        """True when ``other`` is a :class:`HeaderWcs` with the same mapping cards (the same
        grid, whatever their dates); False means "not known to be the same"."""
        if not isinstance(other, HeaderWcs):
            return False
        mine, theirs = self.mapping_cards(), other.mapping_cards()
        return mine is not None and mine == theirs

    def header_cards(self) -> fits.Header:
        """The WCS cards to write with an image on this grid: the mapping and context cards
        as read while unparsed (no astropy.wcs needed), else the parsed WCS's own header."""
        if self._wcs is None and self.mapping_cards() is not None:
            return fits.Header([card for card in self.header.cards
                                if _MAPPING.fullmatch(card.keyword)
                                or _CONTEXT.fullmatch(card.keyword)])
        from astropy.utils.exceptions import AstropyWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            return self.resolve().to_header(relax=True)

    def deepcopy(self) -> HeaderWcs:
        """An independent copy (still unparsed if this one is)."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo: dict) -> HeaderWcs:
        twin = HeaderWcs(self.header.copy(), self.source)
        twin._wcs = copy.deepcopy(self._wcs, memo)
        return twin

    def __getitem__(self, item: Any) -> Any:
        return self.resolve()[item]

    def __getattr__(self, name: str) -> Any:
        # Only called for what this class lacks; dunder lookups (copy, pickle) stay here.
        if name.startswith("__") or name in ("header", "source", "_wcs"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        state = "parsed" if self._wcs is not None else "unparsed"
        return f"HeaderWcs({self.source!r}, {state})"


def as_wcs(wcs: WCS | HeaderWcs | None) -> WCS | None:
    """``wcs`` as an :class:`astropy.wcs.WCS` (a :class:`HeaderWcs` is parsed)."""
    return wcs.resolve() if isinstance(wcs, HeaderWcs) else wcs
