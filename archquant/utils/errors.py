"""The one user-error type and the exit codes of the commands.

A ``UserError`` is bad input the user can fix (a config value, a missing or corrupt file, an infeasible budget);
its message names what to change. ``archquant.cli`` turns it into a one-line message and exit code 2; any other
exception is a bug and keeps its traceback. Error classes of the package subclass it (and a builtin such as
``ValueError`` where callers catch that).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception (Python's own code for an uncaught one)
EXIT_USER_ERROR = 2  # bad input: the message says what to change
EXIT_SLO_UNMET = 3  # archquant-pick / archquant-run: no point meets the SLO (picked.json says so, met: false)


class UserError(Exception):
    """Bad input the user can fix; the message names the key, file or value to change."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""


class ExistingFileError(UserError, FileExistsError):
    """An output would overwrite something the user did not allow to be overwritten."""


class InputError(UserError, ValueError):
    """A value the user gave (a config key, an SLO, a task name) that cannot be used as it is."""
