"""Where the rollback counter lives outside the database: a sidecar file or a keystore entry.

Every committed write increments a counter inside the database (authenticated together with
the store's state digest). After the commit, the same value is copied here. On open, a
database whose counter is lower than the copy is an older copy of the store: RollbackError.
The copy may lag the database by one commit after a crash, never lead it.
"""

from __future__ import annotations

import base64
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import keyring
import keyring.errors

from edgeperso._errors import InvalidInputError, KeyUnavailableError, RollbackError, StorageError
from edgeperso.store import _crypto

try:
    import fcntl
except ImportError:  # Windows: sidecar writes are then serialised by the database lock only
    fcntl = None  # type: ignore[assignment]

__all__ = ["Counter", "KeyringCounter", "SidecarCounter", "open_counter"]

_MAGIC = b"EPC1"
_SLOT = 64  # magic (4) + store id (16) + counter (8) + HMAC (32) + padding (4)


@dataclass(frozen=True)
class SidecarCounter:
    """Keep the rollback counter in a file; `path` defaults to ``<store path>.counter``.

    Put it on storage an attacker who can replace the database cannot also roll back
    (e.g. app-private storage excluded from cloud backup) for the check to mean much.
    """

    path: str | None = None


@dataclass(frozen=True)
class KeyringCounter:
    """Keep the rollback counter in the OS keystore entry ``<profile>:counter``."""

    service: str
    profile: str

    def __post_init__(self) -> None:
        if not self.service or not self.profile:
            raise InvalidInputError("KeyringCounter needs a non-empty service and profile")


def _slot(key: bytes, store_id: bytes, value: int) -> bytes:
    body = _MAGIC + store_id + value.to_bytes(8, "big")
    return (body + _crypto.mac(key, b"counter", body)).ljust(_SLOT, b"\0")


def _parse(key: bytes, store_id: bytes, slot: bytes) -> int | None:
    """The counter in a slot, None if the slot is blank or torn; RollbackError if foreign."""
    if len(slot) != _SLOT or slot[:4] != _MAGIC:
        return None
    body, tag = slot[:28], slot[28:60]
    if body[4:20] != store_id:
        raise RollbackError(
            "the rollback counter belongs to another store: this database was replaced; "
            "restore the right file, or import a backup to start a new history"
        )
    if _crypto.mac(key, b"counter", body) != tag:
        return None
    return int.from_bytes(body[20:28], "big")


class Counter(ABC):
    @abstractmethod
    def exists(self) -> bool:
        """Whether any counter is recorded here (for any store)."""

    @abstractmethod
    def read(self, key: bytes, store_id: bytes) -> int | None:
        """The recorded counter, or None if nothing was ever recorded for this store."""

    @abstractmethod
    def advance(self, key: bytes, store_id: bytes, value: int) -> None:
        """Record `value` unless a higher value is already recorded."""

    @abstractmethod
    def reset(self, key: bytes, store_id: bytes, value: int) -> None:
        """Record `value` for a new history (store created or backup imported)."""


class _Sidecar(Counter):
    # Two slots written alternately, each fsynced: a torn write damages only the slot being
    # written, and the other still holds the previous value.
    def __init__(self, path: Path) -> None:
        self._path = path

    def exists(self) -> bool:
        return self._path.exists()

    def read(self, key: bytes, store_id: bytes) -> int | None:
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the rollback counter ({exc.strerror})") from None
        try:
            if fcntl is not None:  # never halfway through another process's advance()
                fcntl.flock(fd, fcntl.LOCK_SH)
            data = os.pread(fd, 2 * _SLOT, 0)
        except OSError as exc:
            raise StorageError(f"cannot read the rollback counter ({exc.strerror})") from None
        finally:
            os.close(fd)
        if not data:
            # Created by an advance() that stopped before its first write: nothing was
            # recorded, exactly as when the file is missing.
            return None
        values = [_parse(key, store_id, data[i : i + _SLOT]) for i in (0, _SLOT)]
        valid = [v for v in values if v is not None]
        if not valid:
            raise RollbackError(
                "the rollback counter file is damaged; the store cannot prove it is current"
            )
        return max(valid)

    def advance(self, key: bytes, store_id: bytes, value: int) -> None:
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot write the rollback counter ({exc.strerror})") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            data = os.pread(fd, 2 * _SLOT, 0).ljust(2 * _SLOT, b"\0")
            values = [_parse(key, store_id, data[i : i + _SLOT]) for i in (0, _SLOT)]
            current = [-1 if v is None else v for v in values]
            if max(current) >= value:
                return
            target = 0 if current[0] <= current[1] else 1
            os.pwrite(fd, _slot(key, store_id, value), target * _SLOT)
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot write the rollback counter ({exc.strerror})") from None
        finally:
            os.close(fd)

    def reset(self, key: bytes, store_id: bytes, value: int) -> None:
        slot = _slot(key, store_id, value)
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, slot + slot)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write the rollback counter ({exc.strerror})") from None


class _Keystore(Counter):
    def __init__(self, where: KeyringCounter) -> None:
        self._service = where.service
        self._entry = f"{where.profile}:counter"

    def exists(self) -> bool:
        try:
            return keyring.get_password(self._service, self._entry) is not None
        except keyring.errors.KeyringError:
            return False

    def read(self, key: bytes, store_id: bytes) -> int | None:
        try:
            value = keyring.get_password(self._service, self._entry)
        except keyring.errors.KeyringError as exc:
            raise KeyUnavailableError(
                f"cannot read the rollback counter from the OS keystore ({type(exc).__name__})"
            ) from None
        if value is None:
            return None
        try:
            slot = base64.b64decode(value, validate=True)
        except ValueError:
            slot = b""
        parsed = _parse(key, store_id, slot)
        if parsed is None:
            raise RollbackError("the rollback counter in the OS keystore is damaged")
        return parsed

    def advance(self, key: bytes, store_id: bytes, value: int) -> None:
        current = self.read(key, store_id)
        if current is None or current < value:
            self.reset(key, store_id, value)

    def reset(self, key: bytes, store_id: bytes, value: int) -> None:
        encoded = base64.b64encode(_slot(key, store_id, value)).decode("ascii")
        try:
            keyring.set_password(self._service, self._entry, encoded)
        except keyring.errors.KeyringError as exc:
            raise KeyUnavailableError(
                f"cannot write the rollback counter to the OS keystore ({type(exc).__name__})"
            ) from None


def open_counter(where: SidecarCounter | KeyringCounter | None, store: Path) -> Counter | None:
    if where is None:
        return None
    if isinstance(where, KeyringCounter):
        return _Keystore(where)
    return _Sidecar(Path(where.path) if where.path else store.with_name(store.name + ".counter"))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
