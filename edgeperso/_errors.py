"""The errors EdgePerso raises, grouped by what the caller can do about them.

    EdgePersoError                 base of everything below
    ├── InvalidInputError          the call was wrong: fix the arguments (also a ValueError)
    ├── UnsupportedError           valid, but not supported by this version or bundle
    ├── IntegrityError             stored bytes failed verification: do not trust them
    │   ├── BundleIntegrityError   a bundle file is missing, truncated or tampered with
    │   ├── TamperedError          a sealed store record or file failed authentication
    │   └── RollbackError          the store is older than the last state this device saw
    ├── KeyUnavailableError        a key could not be obtained (keystore missing, wrong secret)
    │   └── WrongKeyError          a key or passphrase was given, and it is not the right one
    ├── LockedError                another process holds the resource: retry later
    ├── CancelledError             the caller cancelled before there was a result to return
    ├── StorageError               the disk refused (full, read-only, I/O error)
    └── BudgetExhaustedError       a privacy or training budget is spent

`edgeperso.federation` adds two of its own, both EdgePersoError: CoordinatorUnavailableError
(the coordinator could not be reached or kept failing: call resume() later) and
CoordinatorProtocolError (it answered something the device cannot use; nothing was taken
from it).

Every message says what was wrong and what to do next. No message contains user text,
labels or key material.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhaustedError",
    "BundleIntegrityError",
    "CancelledError",
    "EdgePersoError",
    "IntegrityError",
    "InvalidInputError",
    "KeyUnavailableError",
    "LockedError",
    "RollbackError",
    "StorageError",
    "TamperedError",
    "UnsupportedError",
    "WrongKeyError",
]


class EdgePersoError(Exception):
    """Base class of every error raised by EdgePerso."""


class InvalidInputError(EdgePersoError, ValueError):
    """An argument was invalid; the message names it and the accepted values."""


class UnsupportedError(EdgePersoError):
    """The request is well-formed but this version or bundle does not support it."""


class IntegrityError(EdgePersoError):
    """Stored bytes failed verification; nothing derived from them was returned."""


class BundleIntegrityError(IntegrityError):
    """A bundle file is missing, truncated, or does not match its manifest hash."""


class TamperedError(IntegrityError):
    """A sealed record or file failed authentication (modified, moved or truncated)."""


class RollbackError(IntegrityError):
    """The store is older than the newest state this device has recorded."""


class KeyUnavailableError(EdgePersoError):
    """A key-encryption key could not be obtained."""


class WrongKeyError(KeyUnavailableError):
    """The key or passphrase given does not open this store."""


class LockedError(EdgePersoError):
    """Another process or thread holds the resource; retry when it is released."""


class CancelledError(EdgePersoError):
    """The call was cancelled (its `cancel` callback, or a `forget` of the same user) before
    it had a result; nothing it would have written was written."""


class StorageError(EdgePersoError):
    """The storage layer failed (disk full, read-only file system, I/O error)."""


class BudgetExhaustedError(EdgePersoError):
    """A configured budget (privacy epsilon, training time) is spent."""
