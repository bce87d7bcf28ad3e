"""Integer mask with named bit planes, stored with its name->bit map in the FITS header."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from astropy.io import fits

from apqa.allocator import written_zeros
from apqa.datamodel.blocks import ROWS, row_blocks
from apqa.errors import InputError

#: Default planes, in bit order. New planes are appended, never renumbered.
DEFAULT_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "CR",
    "EDGE",
    "NO_DATA",
    "INTRP",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "STREAK",
    "INJECTED",
    "INJECTED_TEMPLATE",
)

MASK_DTYPE = np.int32
_HEADER_PREFIX = "MP_"


def stored_pixels(array: np.ndarray, dtype: type) -> np.ndarray:
    """``array`` as ``dtype``; a read-only big-endian array of that type (a memory-mapped FITS
    plane, see ``read_exposure(lazy=True)``) is kept as it is, not read and converted.

    Examples
    --------
    >>> stored_pixels(np.zeros(3, ">f4"), np.float32).dtype.str  # writeable: converted
    '<f4'
    >>> mapped = np.zeros(3, ">f4"); mapped.flags.writeable = False
    >>> stored_pixels(mapped, np.float32) is mapped
    True
    """
    if (isinstance(array, np.ndarray) and not array.flags.writeable
            and array.dtype == np.dtype(dtype).newbyteorder(">")):
        return array
    return np.asarray(array, dtype=dtype)


class Mask:
    """A 2-d ``int32`` bit mask plus the map from plane name to bit number.

    Parameters
    ----------
    array
        Mask values; converted to ``int32``.
    planes
        Plane name -> bit number. Defaults to :data:`DEFAULT_PLANES` in order.

    Examples
    --------
    >>> m = Mask.zeros((4, 4))
    >>> m.set("SAT", np.eye(4, dtype=bool))
    >>> int(m.is_set("SAT").sum())
    4
    >>> m.bitmask(["BAD", "SAT"])
    3
    """

    def __init__(self, array: np.ndarray, planes: Mapping[str, int] | None = None) -> None:
        self.array = stored_pixels(array, MASK_DTYPE)
        if self.array.ndim != 2:
            raise InputError(f"mask: expected a 2-d array, got shape {self.array.shape}")
        self.planes: dict[str, int] = dict(
            planes if planes is not None else {n: i for i, n in enumerate(DEFAULT_PLANES)}
        )
        bits = list(self.planes.values())
        if len(set(bits)) != len(bits) or any(not 0 <= b < 31 for b in bits):
            raise InputError(f"mask planes: bits must be unique and in 0..30, got {self.planes}")

    @classmethod
    def zeros(cls, shape: tuple[int, int], planes: Mapping[str, int] | None = None) -> Mask:
        """An empty mask of ``shape``, written through at once (its planes are read before
        they are set: see :func:`apqa.allocator.written_zeros`)."""
        return cls(written_zeros(shape, MASK_DTYPE), planes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape  # type: ignore[return-value]

    def add_plane(self, name: str) -> int:
        """Add a plane (if missing) and return its bit number."""
        if name not in self.planes:
            bit = max(self.planes.values(), default=-1) + 1
            if bit > 30:
                raise InputError(f"mask: cannot add plane '{name}': bit {bit} is beyond 0..30")
            self.planes[name] = bit
        return self.planes[name]

    def bitmask(self, names: str | Iterable[str]) -> int:
        """The integer with the bits of ``names`` set; unknown names raise ``InputError``."""
        if isinstance(names, str):
            names = [names]
        value = 0
        for name in names:
            if name not in self.planes:
                raise InputError(f"mask: unknown plane '{name}'; known: {sorted(self.planes)}")
            value |= 1 << self.planes[name]
        return value

    def set(self, name: str, where: np.ndarray | tuple) -> None:
        """Set plane ``name`` where the boolean array (or index) ``where`` selects."""
        bit = MASK_DTYPE(self.bitmask(name))
        if not (isinstance(where, np.ndarray) and where.dtype == bool
                and where.shape == self.array.shape):
            self.array[where] |= bit
            return
        selected = np.count_nonzero(where)
        if selected * 64 < where.size:  # sparse: a masked ufunc touches only those pixels
            if selected:
                np.bitwise_or(self.array, bit, out=self.array, where=where)
            return
        # Dense: OR in (where * bit) by blocks of rows; boolean indexing would gather and
        # scatter every selected pixel, ten times slower on an image-sized plane.
        block = np.empty((min(ROWS, self.array.shape[0]), self.array.shape[1]), MASK_DTYPE)
        for rows in row_blocks(self.array.shape[0]):
            target = self.array[rows]
            part = block[:len(target)]
            np.multiply(where[rows], bit, out=part)
            np.bitwise_or(target, part, out=target)

    def clear(self, name: str) -> None:
        """Clear plane ``name`` everywhere."""
        self.array &= MASK_DTYPE(~self.bitmask(name))

    def is_set(self, names: str | Iterable[str]) -> np.ndarray:
        """Boolean array: any of ``names`` set."""
        bits = self.bitmask(names)
        height, width = self.array.shape
        selected = np.empty((height, width), dtype=bool)
        # By blocks of rows: no image-sized integer temporary to allocate and fault in.
        block = np.empty((min(ROWS, height), width), MASK_DTYPE)
        for rows in row_blocks(height):
            source = self.array[rows]
            part = block[:len(source)]
            np.bitwise_and(source, bits, out=part)
            np.not_equal(part, 0, out=selected[rows])
        return selected

    def copy(self) -> Mask:
        return Mask(self.array.copy(), self.planes)

    def to_header(self, header: fits.Header) -> None:
        """Write the plane map as ``MP_<NAME> = bit`` cards."""
        for name, bit in sorted(self.planes.items(), key=lambda item: item[1]):
            header[f"HIERARCH {_HEADER_PREFIX}{name}"] = (bit, f"mask plane bit for {name}")

    @staticmethod
    def planes_from_header(header: fits.Header) -> dict[str, int] | None:
        """Read the plane map written by :meth:`to_header`; ``None`` when there is none."""
        planes = {
            key[len(_HEADER_PREFIX):]: int(value)
            for key, value in header.items()
            if key.startswith(_HEADER_PREFIX)
        }
        return planes or None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Mask)
            and self.planes == other.planes
            and np.array_equal(self.array, other.array)
        )

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, planes={list(self.planes)})"
