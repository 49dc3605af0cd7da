"""A checkpoint folder on disk, whatever its format: written into a temporary sibling and
renamed into place (so PATH is absent, the old one, or complete), and the tokenizer files it
carries."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

class DestinationExistsError(FileExistsError):
    """The folder to write exists and ``overwrite`` is off; ``path`` names it (a CLI words the
    remedy as its own flag)."""

    def __init__(self, path: Path):
        super().__init__(f"{path} exists; pass overwrite=True to replace it")
        self.path = path


FOLDER_MODE, FILE_MODE = 0o777, 0o666  # what mkdir and open ask for, before the umask


def umask_mode(requested: int) -> int:
    """The mode a new folder (``FOLDER_MODE``) or file (``FILE_MODE``) gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


@contextlib.contextmanager
def write_aside(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path`` to write into; on success it is renamed to
    ``path`` (replacing it with ``overwrite``), on any error or interrupt it is removed. PATH
    is therefore either absent, the old one, or complete, and has the mode any new folder gets
    (``mkdtemp``'s private 0700 is undone)."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise DestinationExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    staging.chmod(umask_mode(FOLDER_MODE))
    try:
        yield staging
        if path.exists():
            # move the old one aside first, so a failure between the two renames loses nothing
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_not_source(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``ValueError`` when writing ``dst`` would replace ``src`` or a folder holding it (a
    conversion into its own source would lose the source once renamed into place)."""
    source, destination = Path(src).resolve(), Path(dst).resolve()
    if destination == source or destination in source.parents:
        raise ValueError(f"{dst} is the source {src}{'' if destination == source else ' or holds it'}; "
                         f"write the conversion elsewhere")


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def copy_tokenizer_files(source: str | os.PathLike, destination: Path) -> list[str]:
    """Copy the tokenizer files present in ``source``; returns their names."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, destination / name)
            copied.append(name)
    return copied


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)
