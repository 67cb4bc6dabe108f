"""The one base of malaria-edge's domain errors.

Every error a user can meet (an unreadable image, a wrong model file, an output that would be overwritten, too few
cells to adapt on) is a ``MalariaEdgeError``: a one-line message that says what is wrong and what to do, and the
exit status a command gives when it is why the whole job stopped. The rule for that status is one, for every
command: 2 when the command was called wrong (a usage error: a missing folder, a refused option), 1 when the input
or the model could not be used.
"""
from __future__ import annotations

from typing import Optional

EXIT_FAILED = 1
EXIT_USAGE = 2


class MalariaEdgeError(Exception):
    """A domain error: ``str(err)`` is the one line for the user, ``exit_code`` the command's exit status."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str = "", exit_code: Optional[int] = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
