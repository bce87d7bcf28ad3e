"""Observation times as MJD in TAI, the scale of the APDB's ``midpointMjdTai``.

UTC and TAI MJDs, what nearly every image header holds, are converted with the IERS
leap-second table that astropy itself uses (the ``astropy-iers-data`` package), read directly:
astropy.time with its IERS machinery costs 0.3 s to import, a tenth of an ``apqa diff``. Every
other case (other time scales, dates before 1972 when UTC seconds were not SI seconds, the day
of a leap second, dates past the table's expiry) goes to astropy.time unchanged, so results
agree with ``Time(mjd, format="mjd", scale=scale).tai.mjd`` wherever both are defined.
"""

from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

SECONDS_PER_DAY = 86400.0


class LeapSeconds(NamedTuple):
    """The IERS leap-second table: from ``starts[i]`` (UTC MJD) on, TAI - UTC is
    ``offsets[i]`` seconds, until ``expires`` (UTC MJD), past which it is not known."""

    starts: tuple[float, ...]
    offsets: tuple[float, ...]
    expires: float


_MONTHS = {name: number for number, name in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august", "september",
     "october", "november", "december"), start=1)}


def _mjd_of_date(year: int, month: int, day: int) -> float:
    """MJD of 0h on a Gregorian calendar date (Fliegel & Van Flandern's day number)."""
    a = (14 - month) // 12
    y, m = year + 4800 - a, month + 12 * a - 3
    jdn = day + (153 * m + 2) // 5 + 365 * y + y // 4 - y // 100 + y // 400 - 32045
    return float(jdn - 2400001)


def parse_leap_seconds(text: str, source: str) -> LeapSeconds:
    """Parse an IERS ``Leap_Second.dat`` (rows of MJD, day, month, year, TAI-UTC; the expiry
    in a comment line ``File expires on 28 June 2027``).

    Raises
    ------
    ValueError
        Naming ``source`` when no rows or no expiry date are found.
    """
    starts, offsets, expires = [], [], None
    for line in text.splitlines():
        words = line.split()
        if line.lstrip().startswith("#"):
            if "expires" in words and len(words) >= 4:
                day, month, year = words[-3:]
                if month.lower() in _MONTHS and day.isdigit() and year.isdigit():
                    expires = _mjd_of_date(int(year), _MONTHS[month.lower()], int(day))
        elif len(words) == 5:
            starts.append(float(words[0]))
            offsets.append(float(words[4]))
    if not starts or expires is None:
        raise ValueError(f"{source}: expected an IERS leap-second table with an expiry date")
    return LeapSeconds(tuple(starts), tuple(offsets), expires)


@functools.cache
def leap_seconds() -> LeapSeconds:
    """The leap-second table astropy uses (read once per process)."""
    import astropy_iers_data

    path = astropy_iers_data.IERS_LEAP_SECOND_FILE
    with open(path, encoding="ascii") as file:
        return parse_leap_seconds(file.read(), path)


def _tai_minus_utc(mjd_utc: float, table: LeapSeconds) -> float | None:
    """TAI - UTC in seconds at ``mjd_utc``, or None where the table alone does not settle it
    (before its first row, on the day a leap second ends, past its expiry)."""
    if not table.starts[0] <= mjd_utc < table.expires:
        return None
    index = bisect.bisect_right(table.starts, mjd_utc) - 1
    if index + 1 < len(table.starts) and table.starts[index + 1] - mjd_utc <= 1.0:
        return None  # a day 86401 s long: astropy spreads its MJD fraction over them
    return table.offsets[index]


def mjd_tai(mjd: float, scale: str, seconds_later: float = 0.0,
            table: LeapSeconds | None = None) -> float:
    """MJD in TAI of the instant ``seconds_later`` SI seconds after MJD ``mjd`` in ``scale``.

    Parameters
    ----------
    mjd
        Modified Julian Date in the time scale ``scale``.
    scale
        An astropy time scale name ('utc', 'tai', 'tt', 'tdb', ...).
    seconds_later
        Seconds to add (half the exposure time gives the mid-exposure).
    table
        Leap-second table; None takes :func:`leap_seconds`.

    Examples
    --------
    >>> round(mjd_tai(60000.0, "utc"), 9) == round(60000.0 + 37 / 86400, 9)
    True
    """
    offset = None
    if scale == "tai":
        offset = 0.0
    elif scale == "utc":
        offset = _tai_minus_utc(mjd, table or leap_seconds())
    if offset is None:
        from astropy.time import Time, TimeDelta

        start = Time(mjd, format="mjd", scale=scale)
        return float((start + TimeDelta(seconds_later, format="sec")).tai.mjd)
    return mjd + (offset + seconds_later) / SECONDS_PER_DAY
