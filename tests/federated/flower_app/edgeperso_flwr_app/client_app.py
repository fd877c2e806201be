"""The device: `client_app(train)`, its node's deltas chosen by the SuperNode's partition-id."""

from __future__ import annotations

from edgeperso_federated.flower import LocalUpdate, client_app
from flwr.app import Context

from edgeperso.federation import RoundTask
from edgeperso_flwr_app.task import device_data


def train(task: RoundTask, context: Context) -> LocalUpdate:
    """Local "training" adds this node's delta to the persona/global parameters."""
    scenario, _ = task.round_id.split("/")
    data = device_data(int(context.node_config["partition-id"]), scenario)
    before = task.params_for(task.persona_for(data.summary))
    after = {name: value + data.delta.get(name, 0.0) for name, value in before.items()}
    return LocalUpdate(before, after, data.summary, data.num_examples)


app = client_app(train, allow_plain_rounds=True)  # the test runs a plain round too
