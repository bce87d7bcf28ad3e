"""Visit and detector metadata attached to an exposure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class VisitInfo:
    """What was observed, when and how.

    ``band`` is the abstract band (``g``, ``i``...) used for catalogs and metrics;
    ``physical_filter`` is the instrument's filter name (``g DECam SDSS c0001 4720.0 1520.0``).
    ``mjd`` is the exposure midpoint, MJD in the TAI scale; ``seeing`` is the delivered FWHM in
    arcsec; ``boresight_ra``/``boresight_dec`` in degrees and ``rotation_angle`` in degrees are
    optional pointing information.
    """

    visit: int
    detector: int
    band: str
    physical_filter: str
    mjd: float
    exposure_time: float
    airmass: float = 1.0
    seeing: float = float("nan")
    boresight_ra: float = float("nan")
    boresight_dec: float = float("nan")
    rotation_angle: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetectorInfo:
    """Electronic properties of a detector.

    ``gain`` in electrons per ADU, ``read_noise`` in electrons, ``saturation`` in ADU of the
    bias-subtracted image (the level at and above which pixels are saturated).
    """

    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = float("inf")
    name: str = field(default="")

    def to_dict(self) -> dict:
        return asdict(self)
