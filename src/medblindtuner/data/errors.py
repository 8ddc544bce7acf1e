"""Errors raised by the data layer.

A dedicated subclass of ValueError lets the CLI print a clean one-line message for bad input
files while programmatic callers can still catch plain ValueError.
"""

from __future__ import annotations

from medblindtuner.errors import MedBlindTunerError


class DatasetError(MedBlindTunerError, ValueError):
    """A dataset file or folder is missing, unreadable or malformed (message names the file)."""
