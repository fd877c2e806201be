"""EdgePerso: on-device personalization for language models.

The whole public surface is listed in `__all__` below.
"""

from edgeperso._errors import (
    BudgetExhaustedError,
    BundleIntegrityError,
    EdgePersoError,
    IntegrityError,
    InvalidInputError,
    KeyUnavailableError,
    LockedError,
    RollbackError,
    StorageError,
    TamperedError,
    UnsupportedError,
    WrongKeyError,
)
from edgeperso.bundle import Bundle

__version__ = "0.1.0"

__all__ = [
    "BudgetExhaustedError",
    "Bundle",
    "BundleIntegrityError",
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
    "__version__",
]
