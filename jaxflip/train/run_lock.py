"""One run at a time per ``output_dir``: two runs writing the same checkpoints and
``metrics.jsonl`` would interleave their steps.

The lock is an ``flock`` on ``output_dir/.jaxflip.lock``, which the kernel releases when its
process dies however it dies, so a killed run never blocks the next one; the file holds the
holder's host and pid, which name it to a run that finds the lock taken, and to the run that
takes over a lock file a killed run left behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from jaxflip.train.train_config import ConfigError

LOCK_FILE = ".jaxflip.lock"


class RunLock:
    """``with RunLock(output_dir):`` holds the lock of ``output_dir``, or raises ``ConfigError``
    (one line naming the holder) when another run holds it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunLock:
        while True:
            file = open(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise ConfigError(f"job.output_dir: {self.path.parent} is in use by another run ({holder}; lock "
                                  f"{self.path}); wait for it to end or choose another output_dir") from None
            # the file may have been unlinked by its holder's release between open and flock
            if self.path.exists() and os.fstat(file.fileno()).st_ino == os.stat(self.path).st_ino:
                break
            file.close()
        file.seek(0)
        left_by = file.read().strip()
        if left_by:  # a release empties nothing but unlinks: this holder was killed
            print(f"note: {self.path} was left by a run that is gone ({left_by}); taking it over", flush=True)
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # before the unlock: the next run then opens a new file
        self._file.close()
