"""The ``apqa`` command line (Typer). Each sub-command lives in its own module."""

from apqa.cli.app import app, main

__all__ = ["app", "main"]
