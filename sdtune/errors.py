"""How sdtune reports a mistake: one paragraph that says what is wrong and what to
set, and an exit status, never a traceback (``--debug`` or ``SDTUNE_DEBUG=1``
shows it).

Every command runs through ``run_command``. Errors a user can fix are
``UserError`` (and the ``ValueError``, ``FileNotFoundError`` and
``FileExistsError`` that validation raises with such a message).
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake the user can fix; the message says what to change."""


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message says what to change."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError)


def debugging() -> bool:
    return os.environ.get("SDTUNE_DEBUG", "") not in ("", "0")


def run_command(action) -> int:
    """Run ``action``; a user error prints one ``sdtune: error:`` paragraph and gives 1.
    A result with ``stopped_by`` (a signal) gives the shell's 128 + signal."""
    try:
        result = action()
    except USER_ERRORS as exc:
        if debugging():
            raise
        print(f"sdtune: error: {exc}", file=sys.stderr)
        return 1
    stopped_by = getattr(result, "stopped_by", None)
    return 128 + stopped_by if stopped_by else 0  # the shell's code for "ended by this signal"
