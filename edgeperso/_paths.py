"""One check for every path an entry point takes."""

from __future__ import annotations

import os
from pathlib import Path

from edgeperso._errors import InvalidInputError


def check_path(value: object, what: str = "path") -> Path:
    """`value` as a Path, or InvalidInputError: not a str/os.PathLike, empty, or holding a
    NUL byte (SQLite and the OS would cut the name there and write somewhere else)."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidInputError(f"{what} must be a str or os.PathLike, not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"{what} must be a non-empty str path")
    if "\0" in text:
        raise InvalidInputError(f"{what} holds a NUL byte; no file can have that name")
    return Path(text)
