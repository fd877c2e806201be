"""EdgePerso rounds on Flower (install: docs/flower.md): the coordinator's strategy
as a ServerApp, the device as a ClientApp, Flower's SecAgg+ for secure aggregation.

    rounds = FlowerRounds(model, layout, RoundConfig(app_id="notes", model_version=0,
                                                     cohort_size=100, min_survivors=80),
                          epsilon_budget=8.0, delta=1e-6)
    server = server_app(lambda context: rounds, num_rounds=10)       # ServerApp
    client = client_app(train)          # train(task, context) -> LocalUpdate(before, after, ...)

Mapping to the coordinator and how to run it: docs/flower.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeperso_federated._lazy import lazy_exports
from edgeperso_federated.flower._client_app import LocalUpdate, Train, client_app
from edgeperso_federated.flower._records import PLAIN_TRAIN, model_record

if TYPE_CHECKING:
    from edgeperso_federated.flower._rounds import (
        FlowerRounds,
        PublishedRound,
        quantization_range,
    )
    from edgeperso_federated.flower._server_app import run_rounds, server_app
    from edgeperso_federated.flower._strategy import (
        PlainStrategy,
        SecAggStrategy,
        secaggplus_workflow,
    )

# The server side (the coordinator's aggregation, dp-accounting, SQLAlchemy) loads on first
# use: Flower starts a ClientApp process per message, and the device needs none of it.
_LAZY = {
    "FlowerRounds": "_rounds",
    "PublishedRound": "_rounds",
    "quantization_range": "_rounds",
    "run_rounds": "_server_app",
    "server_app": "_server_app",
    "PlainStrategy": "_strategy",
    "SecAggStrategy": "_strategy",
    "secaggplus_workflow": "_strategy",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "PLAIN_TRAIN",
    "FlowerRounds",
    "LocalUpdate",
    "PlainStrategy",
    "PublishedRound",
    "SecAggStrategy",
    "Train",
    "client_app",
    "model_record",
    "quantization_range",
    "run_rounds",
    "secaggplus_workflow",
    "server_app",
]
