"""The command lines' error contract: one ``error:`` line, exit status 2 for bad input and 1
for a fault of the environment (disk full, no permission, a read-only file system)."""

from __future__ import annotations

# OSErrors that say the arguments are wrong, not the machine
BAD_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def exit_status(error: BaseException) -> int:
    """2 for bad input (a ``ValueError``, a path that is missing, exists or is of the wrong
    kind), 1 for the environment (any other ``OSError``)."""
    return 2 if isinstance(error, (ValueError, *BAD_PATH_ERRORS)) else 1
