"""The command lines' error contract: one ``error:`` line, exit status 2 for bad input and 1
for a fault of the environment (disk full, no permission, a read-only file system)."""

from __future__ import annotations

import logging
import re
import sys

# OSErrors that say the arguments are wrong, not the machine
BAD_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def os_error_code(error: BaseException) -> int | None:
    """The errno of an OS fault: an ``OSError``'s, or the one tensorstore (Orbax's writer)
    puts in its ``ValueError`` message (``... No space left on device [os_error_code='28']``),
    or safetensors in its ``SafetensorError``'s (``... No space left on device (os error 28)``)."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", str(error))
    return int(match.group(1) or match.group(2)) if match else None


def exit_status(error: BaseException) -> int:
    """2 for bad input (a ``ValueError``, a path that is missing, exists or is of the wrong
    kind), 1 for the environment (any other ``OSError``, or a ``ValueError`` from an OS fault)."""
    if isinstance(error, BAD_PATH_ERRORS):
        return 2
    return 1 if isinstance(error, OSError) or os_error_code(error) is not None else 2


def one_line(error: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class _ReportedOSFaults(logging.Filter):
    """Drops the records whose exception is an OS fault (Orbax logs one from each thread of a
    save that failed, asyncio one for each of its tasks that nobody awaited any more): the one
    line of the error raised for it says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or os_error_code(error) is None


class _ClosedLoopReports:
    """``sys.unraisablehook`` less tensorstore's reports to a closed event loop: Orbax runs a
    save's writes on an event loop that it closes at the first failure, and every write still
    in flight then reports to it ("Event loop is closed", dozens after a full disk)."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


def quiet_reported_os_faults() -> None:
    """Leave an OS fault of an Orbax save (disk full, no permission) to the one line of the
    error that reports it: without this, dozens of tracebacks of Orbax's threads and tensorstore's
    callbacks come first. Idempotent; other log records and unraisable exceptions pass."""
    for logger in map(logging.getLogger, ("absl", "asyncio")):
        if not any(isinstance(f, _ReportedOSFaults) for f in logger.filters):
            logger.addFilter(_ReportedOSFaults())
    if not isinstance(sys.unraisablehook, _ClosedLoopReports):
        sys.unraisablehook = _ClosedLoopReports(sys.unraisablehook)
