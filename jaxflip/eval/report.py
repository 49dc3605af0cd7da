"""Printing result tables and writing the ``--output`` JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def format_number(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain left-aligned text table."""
    cells = [headers] + [[format_number(value) for value in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def finite_or_null(value):
    """``value`` with every NaN or infinite number as None: JSON has no NaN (``json.dumps``
    would write a bare ``NaN`` that JSON readers reject)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def check_output_path(path: str | Path, *, flag: str = "--output") -> None:
    """Fail now, not after the evaluation, when ``path`` (the file of option ``flag``) cannot be
    written: it is a folder, a parent is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    existing = next(folder for folder in (path.absolute().parent, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OSError(error.errno, f"{flag} {path}: cannot write in {existing} ({error.strerror})") from None


def write_atomically(path: str | Path, content: str | bytes) -> None:
    """``content`` at ``path``, whole or not at all (written aside, then renamed): a reader, or
    a rerun after a kill, never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if isinstance(content, bytes):
            partial.write_bytes(content)
        else:
            partial.write_text(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: str | Path, payload: dict) -> None:
    """``payload`` as JSON at ``path``, written atomically (``write_atomically``)."""
    write_atomically(path, json.dumps(finite_or_null(payload), indent=1, default=str, allow_nan=False) + "\n")
