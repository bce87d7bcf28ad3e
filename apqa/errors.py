"""Typed errors shared by every apqa layer.

Every error that reaches a user is an :class:`ApqaError`; the CLI prints its message as one line
and exits with code 2. Messages name the file, the field and what was expected.
"""

from __future__ import annotations


class ApqaError(Exception):
    """Base class of all errors apqa raises on purpose."""


class InputError(ApqaError):
    """Bad user input: a missing or malformed file, header keyword, option or value."""


class ConfigError(InputError):
    """A configuration file or value that does not validate."""


class StageError(ApqaError):
    """A pipeline stage that cannot proceed on otherwise valid input (e.g. too few stars)."""
