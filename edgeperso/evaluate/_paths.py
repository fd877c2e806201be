"""The files and folders a run writes, checked before it runs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgeperso._errors import InvalidInputError


def output_folder(path: str | os.PathLike[str], what: str) -> Path:
    """Create `path` (and its parents) and check a file can be written in it, so that a bad
    output folder fails now rather than after the run's minutes of work."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{what} {folder} is a file, not a folder; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(
            f"{what} {folder} cannot be created ({exc.strerror}); name a folder that can"
        ) from None
    _probe(folder, f"{what} {folder}")
    return folder


def writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """Check that `path` can be (re)written: its folder exists and takes a new file."""
    file = Path(path)
    if file.is_dir():
        raise InvalidInputError(f"{what}: {file} is a folder; name a file in it")
    if not file.parent.is_dir():
        raise InvalidInputError(f"{what}: the folder of {file} does not exist; create it first")
    _probe(file.parent, f"{what}: the folder of {file}")
    return file


def _probe(folder: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InvalidInputError(
            f"{what} is not writable ({exc.strerror}); name a folder you can write to"
        ) from None
