"""Fake-source injection: catalogs of fakes, drawing them into exposures convolved with the PSF,
and one-to-one matching of the injected truth to DIASources.

Examples
--------
>>> from apqa.injection import CatalogConfig, generate_catalog, inject, match_fakes
"""

from apqa.injection.catalog import (
    CatalogConfig,
    generate_catalog,
    read_catalog,
    validate_catalog,
    write_catalog,
)
from apqa.injection.draw import DrawConfig, InjectionFlag, inject
from apqa.injection.match import (
    MatchConfig,
    MatchResult,
    match_fakes,
    merge_injected,
    truth_difference_flux,
)

__all__ = [
    "CatalogConfig",
    "DrawConfig",
    "InjectionFlag",
    "MatchConfig",
    "MatchResult",
    "generate_catalog",
    "inject",
    "match_fakes",
    "merge_injected",
    "read_catalog",
    "truth_difference_flux",
    "validate_catalog",
    "write_catalog",
]
