"""The one base class of the errors a user can act on.

Bad input, refused settings, tampered or mismatched artifacts, a step asked for too early:
each module raises its own subclass (which also keeps its builtin base, e.g. ValueError), and
the CLI handles them all in one place (`cli.main`): one `error:` line, exit code
`EXIT_USER_ERROR`, no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class MedBlindTunerError(Exception):
    """Base of every user-actionable error in MedBlindTuner."""
