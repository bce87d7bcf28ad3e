"""apqa: validation, QA and metrics for astronomical alert production."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("apqa")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
