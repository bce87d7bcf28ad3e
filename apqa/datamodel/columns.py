"""Source lists by columns, as the differencing path passes them.

Catalogs are pandas DataFrames, except on the path of ``apqa diff``, whose start-up would pay
0.25 s to import pandas: there a source list is a dict of equal-length numpy arrays. Functions
that serve both take either, through this one type, and read a column with
``np.asarray(sources[name])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: A source list by columns: a pandas DataFrame or a dict of equal-length numpy arrays.
Columns = Mapping[str, Any]
