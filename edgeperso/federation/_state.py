"""Where the federation client keeps its credential and an unfinished round between restarts.

Values include secret keys and the device's update, so a real app uses `SealedStateStore`
(the encrypted store). `MemoryStateStore` and `DirectoryStateStore` are for tests and tools:
they do not encrypt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from edgeperso._errors import InvalidInputError
from edgeperso.store import Store
from edgeperso.store._codec import FEDERATION_ACCOUNT

_KEY = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,63}")  # a file name: no "." or ".." first


class StateStore(Protocol):
    """Bytes by key; `put` must be atomic (a reader sees the old or the new value)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class MemoryStateStore:
    """A dict: state lives as long as the object (tests)."""

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._values.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._values[key] = _check_value(value)

    def delete(self, key: str) -> None:
        self._values.pop(key, None)


class DirectoryStateStore:
    """One file per key in a directory, replaced atomically; unencrypted (tests, tools)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._directory = Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InvalidInputError(f"state key {key!r} must match {_KEY.pattern}")
        return self._directory / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        value = _check_value(value)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as file:
            file.write(value)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class SealedStateStore:
    """The encrypted store as the client's state: every value sealed like user data.

    Kept under one device-level account of the store, separate from every app user, and
    shredded with `Store.forget_user(account)`.
    """

    def __init__(self, store: Store, account: str = FEDERATION_ACCOUNT) -> None:
        self._store = store
        self._account = account

    def get(self, key: str) -> bytes | None:
        _check_key(key)
        return self._store.get_blob(self._account, key)

    def put(self, key: str, value: bytes) -> None:
        _check_key(key)
        self._store.put_blob(self._account, key, _check_value(value), keep=1)

    def delete(self, key: str) -> None:
        _check_key(key)
        self._store.delete_blob(self._account, key)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidInputError(f"state key {key!r} must match {_KEY.pattern}")


def _check_value(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):  # bytes(5) would be 5 zero bytes
        raise InvalidInputError("a state value must be bytes")
    return bytes(value)
