"""An EdgePerso round in Flower's records: the model, the task, the device's update.

The model travels as named float32 tensors (global names, persona/<p>/<name>, centroids): in
an ArrayRecord on the Message API, and as a list in `layout.model_tensors()` order where
Flower's SecAgg+ workflow still speaks the legacy FitIns/FitRes. The task is flat config
values: the layout as JSON and the bounds the device clips to before anything leaves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import Scalar

from edgeperso import InvalidInputError
from edgeperso.federation import PersonaLayout, RoundTask
from edgeperso.federation._wire import expect_tensors
from edgeperso_federated._config import RoundConfig

# Plain rounds use their own train action: Flower's secaggplus_mod takes over every plain
# "train" message, so one ClientApp serves both kinds of round.
PLAIN_ACTION = "plain"
PLAIN_TRAIN = f"train.{PLAIN_ACTION}"
MODEL = "edgeperso.model"
TASK = "edgeperso.task"
UPDATE = "edgeperso.update"


def check_model(layout: PersonaLayout, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's tensors in layout order, after checking names, dtypes and shapes."""
    expect_tensors(model, layout.model_tensors())
    return {name: np.asarray(model[name]) for name in layout.model_tensors()}


def model_record(model: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in model.items()})


def model_list(layout: PersonaLayout, model: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(model[name]) for name in layout.model_tensors()]


def model_from_list(layout: PersonaLayout, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    names = list(layout.model_tensors())
    if len(arrays) != len(names):
        raise InvalidInputError(
            f"the round sent {len(arrays)} model tensors, its layout names {len(names)}; "
            "server and client must run the same layout"
        )
    return check_model(layout, dict(zip(names, arrays, strict=True)))


def task_config(
    layout: PersonaLayout, config: RoundConfig, round_id: str, model_version: int
) -> dict[str, Scalar]:
    """What a device needs besides the model: every value is a Flower config scalar."""
    values: dict[str, Scalar] = {
        "round_id": round_id,
        "model_version": model_version,
        "layout": json.dumps(layout.to_json()),
        "clip_norm": config.clip_norm,
        "summary_clip": config.summary_clip,
        "secure": config.secure,
    }
    if config.weight_cap is not None:
        values["weight_cap"] = config.weight_cap
    return values


def task_layout(values: Mapping[str, Any]) -> PersonaLayout:
    try:
        return PersonaLayout.from_json(json.loads(str(values["layout"])))
    except (KeyError, json.JSONDecodeError) as exc:
        raise InvalidInputError(
            f"the round's config has no valid 'layout' ({exc}); the ServerApp must be an "
            "edgeperso_federated.flower one"
        ) from exc


def round_task(values: Mapping[str, Any], model: Mapping[str, np.ndarray]) -> RoundTask:
    layout = task_layout(values)
    data = {
        **layout.to_json(),
        **{k: v for k, v in values.items() if k != "layout"},
        # Flower's secaggplus_mod does its own quantization; the device sends floats.
        "fixed_point_scale": 1.0,
    }
    return RoundTask.from_json(data, check_model(layout, model))
