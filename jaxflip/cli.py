"""The command lines' error contract: one ``error:`` line, exit status 2 for bad input and 1
for a fault of the environment (disk full, no permission, a read-only file system)."""

from __future__ import annotations

import re

# OSErrors that say the arguments are wrong, not the machine
BAD_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def os_error_code(error: BaseException) -> int | None:
    """The errno of an OS fault: an ``OSError``'s, or the one tensorstore (Orbax's writer)
    puts in its ``ValueError`` message (``... No space left on device [os_error_code='28']``)."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"os_error_code='(\d+)'", str(error))
    return int(match.group(1)) if match else None


def exit_status(error: BaseException) -> int:
    """2 for bad input (a ``ValueError``, a path that is missing, exists or is of the wrong
    kind), 1 for the environment (any other ``OSError``, or a ``ValueError`` from an OS fault)."""
    if isinstance(error, BAD_PATH_ERRORS):
        return 2
    return 1 if isinstance(error, OSError) or os_error_code(error) is not None else 2
