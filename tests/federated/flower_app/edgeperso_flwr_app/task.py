"""What both sides of the test app share: the model, the devices' data, the round configs.

test_flower_deployment.py imports this module too, to compute the published model in numpy,
and test_flower.py (the simulation) uses the same model and devices' data.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from edgeperso_federated import RoundConfig

from edgeperso.federation import FederatedParam, PersonaLayout
from edgeperso.federation._layout import persona_key

LAYOUT = PersonaLayout(
    (
        FederatedParam("head_bias", (4,), "global"),
        FederatedParam("shared_lora_a", (3, 4), "global", trainable=False),
        FederatedParam("shared_lora_b", (4, 3), "global"),
        FederatedParam("persona_head", (3, 2), "persona"),
    ),
    num_personas=2,
    summary_dim=3,
)
TRAINABLE = ("head_bias", "shared_lora_b", "persona_head")
CENTROIDS = np.array([[2, 0, 0], [0, 2, 0]], dtype=np.float32)
NODES = 3  # SecAgg+ needs at least 3
CLIP_NORM, SUMMARY_CLIP, WEIGHT_CAP = 1.0, 2.5, 6.0  # weights 1/2, 2/3, 5/6
# Persona weights are 4/3 and 2/3: below the default floor of 1, persona 1 would keep its
# parameters, and the test wants both updated. (test_flower.py checks a persona exactly at
# the floor, where SecAgg+'s rounding lands its weight a few 1e-9 either side.)
MIN_PERSONA_WEIGHT = 0.5


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    model: dict[str, np.ndarray] = {}
    for p in LAYOUT.params:
        names = [p.name] if p.level == "global" else [persona_key(k, p.name) for k in range(2)]
        for name in names:
            model[name] = rng.normal(size=p.shape).astype(np.float32)
    model["centroids"] = CENTROIDS.copy()
    return model


@dataclasses.dataclass(frozen=True)
class DeviceData:
    summary: np.ndarray  # [3]
    delta: dict[str, np.ndarray]  # trainable name -> change made by local training
    num_examples: int


def device_data(node: int, scenario: str, server_round: int = 1) -> DeviceData:
    rng = np.random.default_rng([node, server_round, zlib.crc32(scenario.encode())])
    summary = CENTROIDS[node % 2] + rng.normal(scale=0.3, size=3)
    scale = 0.05 if node == 0 else 0.5  # node 0 stays under the clip norm, the others do not
    shapes = {p.name: p.shape for p in LAYOUT.params}
    delta = {name: rng.normal(scale=scale, size=shapes[name]) for name in TRAINABLE}
    return DeviceData(summary, delta, num_examples=3 + node)


def round_config(scenario: str) -> RoundConfig:
    return RoundConfig(
        app_id=scenario,
        model_version=0,
        cohort_size=NODES,
        min_survivors=NODES,
        secure=scenario == "secure",
        clip_norm=CLIP_NORM,
        summary_clip=SUMMARY_CLIP,
        weight_cap=WEIGHT_CAP,
        min_persona_weight=MIN_PERSONA_WEIGHT,
        # Generous: every stage starts a ClientApp process per node on a loaded machine.
        join_timeout_s=120.0,
        stage_timeout_s=120.0,
    )
