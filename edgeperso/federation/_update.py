"""A round's task as the device sees it, and the device's contribution to it.

The contribution is built from the persona/global parameters before and after local
training: deltas of the trainable ones, clipped jointly to the round's L2 norm (DP-FedAvg
clips on the device), weighted, and placed in the device's own persona block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeperso._errors import InvalidInputError
from edgeperso.federation._layout import PersonaLayout, persona_key
from edgeperso.federation._wire import expect_tensors

CENTROIDS = "centroids"


@dataclasses.dataclass(frozen=True)
class RoundTask:
    """An open round and the model version it trains from."""

    round_id: str
    model_version: int
    layout: PersonaLayout
    clip_norm: float
    summary_clip: float
    weight_cap: float | None  # examples for full weight; None: every device weighs 1
    secure: bool
    fixed_point_scale: float
    model: Mapping[str, np.ndarray]  # global names, persona/<p>/<name>, "centroids" [n, S]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], model: Mapping[str, np.ndarray]) -> RoundTask:
        """The task the coordinator sent, checked: its numbers, and `model` against its
        layout (names, shapes, float32, finite). InvalidInputError names what is wrong."""
        try:
            layout = PersonaLayout.from_json(data)
            cap = data.get("weight_cap")
            task = cls(
                round_id=str(data["round_id"]),
                model_version=int(data["model_version"]),
                layout=layout,
                clip_norm=float(data["clip_norm"]),
                summary_clip=float(data["summary_clip"]),
                weight_cap=None if cap is None else float(cap),
                secure=_strict_bool(data["secure"]),
                fixed_point_scale=float(data["fixed_point_scale"]),
                model=dict(model),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"the coordinator sent an invalid task ({exc!r})") from exc
        bounds = {
            "clip_norm": task.clip_norm,
            "summary_clip": task.summary_clip,
            "fixed_point_scale": task.fixed_point_scale,
        }
        for name, value in bounds.items():  # a negative clip norm would flip and grow updates
            if not (math.isfinite(value) and value > 0):
                raise InvalidInputError(f"the task's {name} must be finite and > 0, got {value}")
        if task.weight_cap is not None and not (
            math.isfinite(task.weight_cap) and task.weight_cap >= 1
        ):
            raise InvalidInputError(f"the task's weight_cap must be >= 1, got {task.weight_cap}")
        if task.model_version < 0:
            raise InvalidInputError("the task's model_version must be >= 0")
        check_model(layout, task.model)
        return task

    def persona_for(self, summary: np.ndarray) -> int:
        """The nearest persona centroid to the user's summary vector (chosen on the device)."""
        return nearest_persona(self.model[CENTROIDS], summary)

    def params_for(self, persona: int) -> dict[str, np.ndarray]:
        """Global parameters and persona `persona`'s copy of the persona parameters."""
        return model_params(self.layout, self.model, persona)


def check_model(layout: PersonaLayout, model: Mapping[str, np.ndarray]) -> None:
    """InvalidInputError unless `model` holds exactly `layout`'s tensors: float32, the right
    shapes, finite. The persona count is compared first, so that a layout claiming a huge
    number of personas is refused before anything is sized by it."""
    if not isinstance(model, Mapping) or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise InvalidInputError("a model must map tensor names to numpy arrays")
    centroids = model.get(CENTROIDS)
    if centroids is None or centroids.shape != (layout.num_personas, layout.summary_dim):
        found = "missing" if centroids is None else f"of shape {list(centroids.shape)}"
        raise InvalidInputError(
            f"the model's {CENTROIDS!r} tensor is {found}; its layout says "
            f"{layout.num_personas} personas of {layout.summary_dim} numbers"
        )
    expect_tensors(model, layout.model_tensors())


def _strict_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"the task's secure flag must be true or false, got {value!r}")
    return value


def nearest_persona(centroids: np.ndarray, summary: np.ndarray) -> int:
    """Index of the centroid [n, S] closest (L2) to `summary` [S]."""
    if centroids.shape[0] == 1:
        return 0
    if summary.shape != centroids.shape[1:]:
        raise InvalidInputError(
            f"user summary has shape {summary.shape}, the round expects ({centroids.shape[1]},)"
        )
    distances = np.linalg.norm(centroids - summary[None, :], axis=1)
    return int(np.argmin(distances))


def model_params(
    layout: PersonaLayout, model: Mapping[str, np.ndarray], persona: int
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for p in layout.params:
        key = p.name if p.level == "global" else persona_key(persona, p.name)
        out[p.name] = model[key]
    return out


def build_contribution(
    task: RoundTask,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    summary: np.ndarray,
    num_examples: int,
) -> tuple[np.ndarray, int]:
    """(float64 vector [layout.length], chosen persona) for one device.

    `before`/`after` hold the persona and global parameters only; a user-level name is an
    error, so a user parameter cannot leave the device by mistake.
    """
    layout = task.layout
    known = {p.name: p for p in layout.params}
    for name in set(before) | set(after):
        if name not in known:
            raise InvalidInputError(
                f"{name!r} is not a persona- or global-level parameter of this round; "
                "user-level parameters never leave the device"
            )
    if num_examples < 1:
        raise InvalidInputError("num_examples must be >= 1 (the device trained on something)")
    deltas: dict[str, np.ndarray] = {}
    for p in layout.params:
        if p.name not in before or p.name not in after:
            if p.trainable:
                raise InvalidInputError(f"parameter {p.name!r} is missing from before/after")
            continue
        old, new = np.asarray(before[p.name]), np.asarray(after[p.name])
        if old.shape != p.shape or new.shape != p.shape:
            raise InvalidInputError(f"parameter {p.name!r} must have shape {p.shape}")
        if not (np.all(np.isfinite(old)) and np.all(np.isfinite(new))):
            raise InvalidInputError(f"parameter {p.name!r} has NaN or infinite values")
        delta = new.astype(np.float64) - old.astype(np.float64)
        if not p.trainable:
            if np.any(delta != 0):
                raise InvalidInputError(
                    f"frozen parameter {p.name!r} changed; the shared LoRA A must stay fixed "
                    "so that averaging B is exact"
                )
            continue
        deltas[p.name] = delta
    user_summary = np.asarray(summary, dtype=np.float64)
    if user_summary.shape != (layout.summary_dim,) or not np.all(np.isfinite(user_summary)):
        raise InvalidInputError(f"the user summary must be {layout.summary_dim} finite numbers")
    persona = task.persona_for(user_summary)
    global_delta = layout.flatten(layout.global_params, deltas)
    persona_delta = layout.flatten(layout.persona_params, deltas)
    scale = _clip_factor(np.concatenate([global_delta, persona_delta]), task.clip_norm)
    clipped_summary = user_summary * _clip_factor(user_summary, task.summary_clip)
    weight = 1.0 if task.weight_cap is None else min(1.0, num_examples / task.weight_cap)
    vector = layout.pack(
        global_delta * scale, persona_delta * scale, persona, clipped_summary, weight
    )
    return vector, persona


def _clip_factor(vector: np.ndarray, bound: float) -> float:
    norm = float(np.linalg.norm(vector))
    return 1.0 if norm <= bound else bound / norm
