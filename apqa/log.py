"""Logging set-up: rich console output for humans, one configuration for the whole CLI."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

LOGGER_NAME = "apqa"


def get_logger(name: str) -> logging.Logger:
    """Return a child of the ``apqa`` logger, e.g. ``get_logger(__name__)``."""
    if not name.startswith(LOGGER_NAME):
        name = f"{LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def configure_logging(verbosity: int = 0, quiet: bool = False) -> None:
    """Configure the ``apqa`` logger for command-line use.

    Parameters
    ----------
    verbosity
        0 for INFO, 1 or more for DEBUG.
    quiet
        Only warnings and errors.
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 0 else logging.INFO)
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
