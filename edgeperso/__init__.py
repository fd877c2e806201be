"""EdgePerso: on-device personalization for language models.

The whole public surface is listed in `__all__` below.
"""

from edgeperso._errors import (
    BudgetExhaustedError,
    BundleIntegrityError,
    CancelledError,
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
from edgeperso.runtime import (
    Personalizer,
    Prediction,
    SessionOptions,
    TrainConfig,
    TrainProgress,
    TrainResult,
)
from edgeperso.store import Example, Feedback, KeyringKey, PassphraseKey, RawKey, Store

__version__ = "0.1.0"

__all__ = [
    "BudgetExhaustedError",
    "Bundle",
    "BundleIntegrityError",
    "CancelledError",
    "EdgePersoError",
    "Example",
    "Feedback",
    "IntegrityError",
    "InvalidInputError",
    "KeyUnavailableError",
    "KeyringKey",
    "LockedError",
    "PassphraseKey",
    "Personalizer",
    "Prediction",
    "RawKey",
    "RollbackError",
    "SessionOptions",
    "StorageError",
    "Store",
    "TamperedError",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "UnsupportedError",
    "WrongKeyError",
    "__version__",
]
