"""Image-sized work a block of rows at a time: temporaries stay small (a block of a 4096-wide
float32 plane is 4 MB) instead of image-sized arrays that a process must allocate and fault in.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Rows per block.
ROWS = 256


def row_blocks(height: int, rows: int = ROWS) -> Iterator[slice]:
    """Slices covering rows ``0 .. height - 1`` in blocks of ``rows`` (the last may be short).

    Examples
    --------
    >>> [(s.start, s.stop) for s in row_blocks(5, 2)]
    [(0, 2), (2, 4), (4, 6)]
    """
    return (slice(start, start + rows) for start in range(0, height, rows))
