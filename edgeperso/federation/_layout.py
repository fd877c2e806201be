"""What a device contributes to a round, as one flat vector with a block per persona.

    [ global deltas (G) | persona 0: deltas (P), summary (S), weight (1) | ... persona n-1 ]

A device writes its weighted, clipped deltas of the global parameters in the first block and
its persona's deltas, its user-summary vector and its weight in its own persona block; every
other persona block is zero. Summed under secure aggregation, the coordinator reads per-persona
sums and counts and never which device belongs to which persona.

Only trainable parameters at level "persona" or "global" are in the vector. The frozen shared
LoRA A is not: it is identical on every device, so averaging B alone is exact (FFA-LoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeperso._errors import InvalidInputError

FEDERATED_LEVELS = ("persona", "global")


@dataclasses.dataclass(frozen=True)
class FederatedParam:
    """A persona- or global-level parameter as the round task describes it."""

    name: str
    shape: tuple[int, ...]
    level: str
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.level not in FEDERATED_LEVELS:
            raise InvalidInputError(
                f"parameter {self.name!r} has level {self.level!r}; only persona and global "
                "parameters are federated (user parameters never leave the device)"
            )
        if not self.name or "/" in self.name:
            raise InvalidInputError(f"parameter name {self.name!r} must be non-empty without '/'")
        if not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise InvalidInputError(f"parameter {self.name!r} has an invalid shape {self.shape}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "level": self.level,
            "trainable": self.trainable,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederatedParam:
        try:
            return cls(
                str(data["name"]), tuple(data["shape"]), str(data["level"]), bool(data["trainable"])
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"invalid parameter description ({exc})") from exc


def federated_params(manifest: Any) -> tuple[FederatedParam, ...]:
    """The persona- and global-level parameters of a bundle `Manifest`."""
    return tuple(
        FederatedParam(p.name, p.shape, p.level, p.trainable)
        for p in manifest.params
        if p.level in FEDERATED_LEVELS
    )


def persona_key(persona: int, name: str) -> str:
    """The name of persona `persona`'s copy of `name` in model payloads."""
    return f"persona/{persona}/{name}"


@dataclasses.dataclass(frozen=True)
class PersonaLayout:
    params: tuple[FederatedParam, ...]
    num_personas: int
    summary_dim: int

    def __post_init__(self) -> None:
        if self.num_personas < 1 or self.summary_dim < 0:
            raise InvalidInputError("a layout needs >= 1 persona and a summary_dim >= 0")
        names = [p.name for p in self.params]
        if len(names) != len(set(names)):
            raise InvalidInputError("federated parameter names must be unique")

    @property
    def global_params(self) -> tuple[FederatedParam, ...]:
        return tuple(p for p in self.params if p.level == "global" and p.trainable)

    @property
    def persona_params(self) -> tuple[FederatedParam, ...]:
        return tuple(p for p in self.params if p.level == "persona" and p.trainable)

    @property
    def global_size(self) -> int:
        return sum(p.size for p in self.global_params)

    @property
    def persona_size(self) -> int:
        return sum(p.size for p in self.persona_params)

    @property
    def block_size(self) -> int:
        return self.persona_size + self.summary_dim + 1

    @property
    def length(self) -> int:
        return self.global_size + self.num_personas * self.block_size

    def pack(
        self,
        global_delta: np.ndarray,  # [global_size]
        persona_delta: np.ndarray,  # [persona_size]
        persona: int,
        summary: np.ndarray,  # [summary_dim]
        weight: float,
    ) -> np.ndarray:  # [length] float64
        if not 0 <= persona < self.num_personas:
            raise InvalidInputError(f"persona {persona} is outside 0..{self.num_personas - 1}")
        vector = np.zeros(self.length, dtype=np.float64)
        vector[: self.global_size] = weight * global_delta
        start = self.global_size + persona * self.block_size
        vector[start : start + self.persona_size] = weight * persona_delta
        vector[start + self.persona_size : start + self.block_size - 1] = weight * summary
        vector[start + self.block_size - 1] = weight
        return vector

    def unpack(self, total: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(global [G], persona deltas [n, P], summaries [n, S], weights [n]) of a summed vector."""
        if total.shape != (self.length,):
            raise InvalidInputError(f"aggregate has shape {total.shape}, expected ({self.length},)")
        blocks = total[self.global_size :].reshape(self.num_personas, self.block_size)
        return (
            total[: self.global_size],
            blocks[:, : self.persona_size],
            blocks[:, self.persona_size : -1],
            blocks[:, -1],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "params": [p.to_json() for p in self.params],
            "num_personas": self.num_personas,
            "summary_dim": self.summary_dim,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PersonaLayout:
        try:
            params = tuple(FederatedParam.from_json(p) for p in data["params"])
            return cls(params, int(data["num_personas"]), int(data["summary_dim"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Infinity: Overflow
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"invalid parameter layout ({exc})") from exc

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> PersonaLayout:
        """The layout a model payload carries as JSON under 'layout' in its safetensors
        metadata (as `json.dumps(layout.to_json())`); `source` names the payload in errors."""
        try:
            data = json.loads(meta["layout"])
        except (KeyError, ValueError) as exc:
            raise InvalidInputError(
                f"{source} has no JSON 'layout' in its safetensors __metadata__ ({exc}); write "
                "json.dumps(layout.to_json()) there (edgeperso_federated.save_model does)"
            ) from exc
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source}: the 'layout' metadata must be a JSON object")
        return cls.from_json(data)

    def model_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Names, dtypes and shapes of a model payload with this layout."""
        expected: dict[str, tuple[str, tuple[int, ...]]] = {}
        for p in self.params:
            if p.level == "global":
                expected[p.name] = ("F32", p.shape)
            else:
                for k in range(self.num_personas):
                    expected[persona_key(k, p.name)] = ("F32", p.shape)
        expected["centroids"] = ("F32", (self.num_personas, self.summary_dim))
        return expected

    def flatten(
        self, params: Sequence[FederatedParam], values: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        return np.concatenate(
            [np.asarray(values[p.name], np.float64).ravel() for p in params] or [np.zeros(0)]
        )

    def split(self, params: Sequence[FederatedParam], flat: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        offset = 0
        for p in params:
            out[p.name] = flat[offset : offset + p.size].reshape(p.shape)
            offset += p.size
        return out
