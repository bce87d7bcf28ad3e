"""apqa: validation, QA and metrics for astronomical alert production."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # The version is looked up on first use: importlib.metadata costs every command ~25 ms
    # of start-up, and `apqa diff` is timed whole.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("apqa")
        except PackageNotFoundError:  # a source tree that was never installed
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'apqa' has no attribute {name!r}")
