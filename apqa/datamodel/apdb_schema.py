"""The Rubin APDB schema, read from the installed lsst-sdm-schemas ``apdb.yaml`` (never retyped).

Catalogs that travel through apqa (DiaSource, DiaObject, DiaForcedSource) are pandas tables whose
column names, dtypes and NOT NULL rules come from here, so that anything that reads Rubin's APDB
reads apqa's tables.

Examples
--------
>>> from apqa.datamodel.apdb_schema import load_apdb_schema, empty_table
>>> schema = load_apdb_schema()
>>> schema.version
'10.0.0'
>>> table = empty_table("DiaSource")
>>> "psfFlux" in table.columns
True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd
import yaml

from apqa.errors import InputError

# Felis datatypes -> pandas dtypes. Nullable integer/boolean columns use pandas' masked dtypes so
# that a missing value stays missing instead of turning into 0 or False.
_NOT_NULL_DTYPES = {
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "byte": "int8",
    "double": "float64",
    "float": "float32",
    "boolean": "bool",
    "char": "object",
    "string": "object",
    "text": "object",
    "timestamp": "datetime64[ns]",
}
_NULLABLE_DTYPES = {
    **_NOT_NULL_DTYPES,
    "long": "Int64",
    "int": "Int32",
    "short": "Int16",
    "byte": "Int8",
    "boolean": "boolean",
}


@dataclass(frozen=True)
class ApdbColumn:
    """One column of an APDB table as declared in ``apdb.yaml``."""

    name: str
    datatype: str
    nullable: bool
    unit: str
    description: str
    #: Declared maximum length of ``char``/``string`` columns (None when not declared).
    length: int | None = None

    @property
    def dtype(self) -> str:
        """The pandas dtype used for this column in apqa's tables."""
        table = _NULLABLE_DTYPES if self.nullable else _NOT_NULL_DTYPES
        return table[self.datatype]


@dataclass(frozen=True)
class ApdbTable:
    """An APDB table: its columns in declaration order and its primary key."""

    name: str
    columns: tuple[ApdbColumn, ...]
    primary_key: tuple[str, ...]
    #: Declared indexes as (index name, column names).
    indexes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def dtypes(self) -> list[str]:
        """The pandas dtypes of the columns, in order (see :attr:`ApdbColumn.dtype`)."""
        return [c.dtype for c in self.columns]

    def column(self, name: str) -> ApdbColumn:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"{self.name} has no column {name!r}")


@dataclass(frozen=True)
class ApdbSchema:
    """The whole APDB schema with its version string."""

    version: str
    tables: dict[str, ApdbTable]

    def __getitem__(self, name: str) -> ApdbTable:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"apdb.yaml has no table {name!r}") from None


def _strip_ref(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(str(v).split(".")[-1].lstrip("#") for v in items)


@cache
def load_apdb_schema() -> ApdbSchema:
    """Read ``apdb.yaml`` from the installed ``lsst-sdm-schemas`` package.

    Returns
    -------
    ApdbSchema
        Tables with their columns (name, Felis datatype, nullability, IVOA unit, description).
    """
    path = resources.files("lsst.sdm.schemas").joinpath("apdb.yaml")
    # The C loader (libyaml, when PyYAML has it) reads the 5,000-line schema ten times faster.
    raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    tables = {}
    for table in raw["tables"]:
        cols = tuple(
            ApdbColumn(
                name=c["name"],
                datatype=c["datatype"],
                nullable=bool(c.get("nullable", True)),
                unit=str(c.get("fits:tunit") or c.get("ivoa:unit") or ""),
                description=str(c.get("description", "")).strip(),
                length=int(c["length"]) if "length" in c else None,
            )
            for c in table["columns"]
        )
        tables[table["name"]] = ApdbTable(
            name=table["name"], columns=cols, primary_key=_strip_ref(table.get("primaryKey")),
            indexes=tuple((ix["name"], _strip_ref(ix["columns"]))
                          for ix in table.get("indexes", []) if ix.get("columns")),
        )
    return ApdbSchema(version=str(raw.get("version", "")), tables=tables)


def require_apdb_band(band: str, physical_filter: str, where: str, fix: str) -> str:
    """``band`` when it fits the APDB's ``band`` column (one character: Rubin's ugrizy), else
    an :class:`InputError` that names ``where``, the filter it came from and ``fix``."""
    length = load_apdb_schema()["DiaSource"].column("band").length or 1
    if not 1 <= len(band) <= length:
        size = "one-character" if length == 1 else f"{length}-character"
        raise InputError(f"{where}: band {band!r} (from FILTER {physical_filter!r}) does not "
                         f"fit the APDB's {size} band column; {fix}")
    return band


def _missing_column(col: ApdbColumn, n_rows: int) -> pd.Series:
    """``n_rows`` missing values of a column: zeros / False where it is NOT NULL (numeric)."""
    if col.dtype == "object":
        return pd.Series([None] * n_rows, dtype="object")
    if col.dtype.startswith("datetime"):
        return pd.Series(np.full(n_rows, np.datetime64("NaT"), "datetime64[ns]"))
    if not col.nullable:
        return pd.Series(np.zeros(n_rows, dtype=col.dtype))
    if col.dtype.startswith("float"):
        return pd.Series(np.full(n_rows, np.nan, dtype=col.dtype))
    return pd.Series(pd.array([pd.NA] * n_rows, dtype=col.dtype))


def empty_table(name: str, n_rows: int = 0) -> pd.DataFrame:
    """A table with every column of APDB table ``name``, typed, all values missing.

    NOT NULL numeric columns are filled with zeros and booleans with False so that the table is
    valid from the start; callers overwrite what they measure.
    """
    table = load_apdb_schema()[name]
    return pd.DataFrame({col.name: _missing_column(col, n_rows) for col in table.columns})


def _typed(values: tuple, col: ApdbColumn) -> pd.Series | None:
    """A database column (Python values, None for NULL) as ``col``'s dtype, or None when it
    needs :func:`conform`'s checks (a NULL in a NOT NULL column, an unexpected type)."""
    dtype = col.dtype
    try:
        if dtype in ("float32", "float64"):  # NULL becomes NaN
            return pd.Series(np.array(values, dtype=np.float64).astype(dtype, copy=False))
        if dtype == "object":
            array = np.empty(len(values), dtype=object)
            array[:] = values
            return pd.Series(array, dtype=object)
        if any(v is None for v in values):
            return pd.Series(pd.array(values, dtype=dtype)) if col.nullable else None
        if dtype.startswith("datetime"):
            return None
        return pd.Series(np.array(values, dtype=dtype.lower()), dtype=dtype)
    except (TypeError, ValueError):
        return None


def frame_from_rows(rows: list[tuple], names: list[str], name: str, *,
                    source: str = "table") -> pd.DataFrame:
    """APDB table ``name`` from database rows (tuples in the order of ``names``, None for
    NULL), typed column by column; the same result as :func:`conform` of an object table,
    without casting every value through Python objects twice.
    """
    by_name = dict(zip(names, zip(*rows, strict=True), strict=True)) if rows else {
        n: () for n in names}
    columns: dict[str, pd.Series] = {}
    for col in load_apdb_schema()[name].columns:
        values = by_name.get(col.name)
        typed = None if values is None else _typed(values, col)
        if typed is not None:
            columns[col.name] = typed
        elif values is not None:
            columns[col.name] = pd.Series(list(values), dtype=object)
    return conform(pd.DataFrame(columns, index=pd.RangeIndex(len(rows))), name, source=source)


def _check_not_null(values: pd.Series, col: ApdbColumn, table: str, source: str) -> None:
    missing = values.isna()
    if missing.any():
        raise InputError(f"{source}: {table} column {col.name!r} is NOT NULL but has "
                         f"{int(missing.sum())} missing values")


def _check_length(values: pd.Series, col: ApdbColumn, table: str, source: str) -> None:
    """Strings longer than the column's declared length are an error (SQLite would store
    them, PostgreSQL refuses them: the same table must be valid for both)."""
    if col.length is None or len(values) == 0:
        return
    present = values.dropna()
    too_long = present.astype(str).str.len() > col.length
    if too_long.any():
        example = str(present[too_long].iloc[0])
        raise InputError(f"{source}: {table} column {col.name!r} holds at most {col.length} "
                         f"characters, got {example!r} ({len(example)})")


def conform(frame: pd.DataFrame, name: str, *, source: str = "table") -> pd.DataFrame:
    """Cast ``frame`` to APDB table ``name``: its column order and dtypes, extra columns dropped.

    Missing nullable columns are added as missing values. A missing or null NOT NULL column, or
    a string longer than its column's declared length, is an error that names ``source`` and
    the column.
    """
    table = load_apdb_schema()[name]
    frame = frame.reset_index(drop=True)
    if list(frame.columns) == table.names and [str(d) for d in frame.dtypes] == table.dtypes:
        # Already conformed (e.g. read back from the APDB or made by an earlier step): only
        # the NOT NULL columns that can hold a missing value need a look.
        for col in table.columns:
            if not col.nullable and col.dtype in ("float32", "float64", "object"):
                _check_not_null(frame[col.name], col, name, source)
            _check_length(frame[col.name], col, name, source)
        return frame
    columns = {}
    for col in table.columns:
        if col.name not in frame.columns:
            if not col.nullable:
                raise InputError(f"{source}: {name} column {col.name!r} is NOT NULL but missing")
            columns[col.name] = _missing_column(col, len(frame))
            continue
        values = frame[col.name]
        if not col.nullable:
            _check_not_null(values, col, name, source)
        if values.dtype == col.dtype:  # already right (e.g. read back from the APDB)
            columns[col.name] = values
            continue
        try:
            columns[col.name] = values.astype(col.dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{source}: {name} column {col.name!r} cannot be cast to {col.dtype}: {exc}"
            ) from None
    for col in table.columns:
        _check_length(columns[col.name], col, name, source)
    # One frame built from all its columns at once: assigning ~100 columns one by one into a
    # prepared empty frame cost 10x more.
    return pd.DataFrame(columns)
