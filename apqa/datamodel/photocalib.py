"""Photometric calibration: nJy per count, with its error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: AB magnitude of 1 nJy: m_AB = -2.5 log10(f / 3631 Jy) = 31.4 - 2.5 log10(f / nJy).
AB_MAG_OF_ONE_NJY = 31.4


def njy_to_abmag(flux_njy: np.ndarray | float) -> np.ndarray | float:
    """AB magnitude of a flux in nJy."""
    return AB_MAG_OF_ONE_NJY - 2.5 * np.log10(flux_njy)


def abmag_to_njy(mag: np.ndarray | float) -> np.ndarray | float:
    """Flux in nJy of an AB magnitude."""
    return 10.0 ** (-0.4 * (np.asarray(mag) - AB_MAG_OF_ONE_NJY))


@dataclass(frozen=True)
class PhotoCalib:
    """Conversion from image counts (ADU or electrons of the calibrated image) to nJy.

    Parameters
    ----------
    calibration_mean
        nJy per count.
    calibration_err
        1-sigma error of ``calibration_mean`` in nJy per count.

    Examples
    --------
    >>> pc = PhotoCalib.from_zero_point(27.0)
    >>> round(float(pc.to_abmag(1.0)), 6)
    27.0
    """

    calibration_mean: float
    calibration_err: float = 0.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.calibration_mean) or self.calibration_mean <= 0:
            raise ValueError(
                f"calibration_mean must be finite and > 0, got {self.calibration_mean}")
        if not np.isfinite(self.calibration_err) or self.calibration_err < 0:
            raise ValueError(f"calibration_err must be finite and >= 0, got {self.calibration_err}")

    @classmethod
    def from_zero_point(cls, zero_point: float, zero_point_err: float = 0.0) -> PhotoCalib:
        """From an AB zero point (magnitude of one count) and its error in mag."""
        mean = float(10.0 ** (0.4 * (AB_MAG_OF_ONE_NJY - zero_point)))
        return cls(mean, mean * 0.4 * np.log(10.0) * zero_point_err)

    @property
    def zero_point(self) -> float:
        """AB magnitude of one count."""
        return float(AB_MAG_OF_ONE_NJY - 2.5 * np.log10(self.calibration_mean))

    @property
    def zero_point_err(self) -> float:
        """Error of :attr:`zero_point` in mag."""
        return float(2.5 / np.log(10.0) * self.calibration_err / self.calibration_mean)

    def to_njy(self, counts: np.ndarray | float) -> np.ndarray | float:
        """Counts -> nJy."""
        return np.asarray(counts) * self.calibration_mean

    def to_counts(self, flux_njy: np.ndarray | float) -> np.ndarray | float:
        """nJy -> counts."""
        return np.asarray(flux_njy) / self.calibration_mean

    def to_abmag(self, counts: np.ndarray | float) -> np.ndarray | float:
        """Counts -> AB magnitude."""
        return njy_to_abmag(self.to_njy(counts))
