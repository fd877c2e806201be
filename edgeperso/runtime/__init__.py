"""Personalized inference and on-device training over a bundle and an encrypted store."""

from edgeperso.runtime._personalizer import Personalizer, Prediction, SharedUpdate
from edgeperso.runtime._session import SessionOptions
from edgeperso.runtime._shared import SharedTrainConfig, SharedTrainResult
from edgeperso.runtime._trainer import TrainConfig, TrainProgress, TrainResult

__all__ = [
    "Personalizer",
    "Prediction",
    "SessionOptions",
    "SharedTrainConfig",
    "SharedTrainResult",
    "SharedUpdate",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
]
