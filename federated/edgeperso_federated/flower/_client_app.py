"""The ClientApp around an EdgePerso device.

The app's `train` callback gets the round's task (model, layout, clipping bounds) and returns
the persona/global parameters before and after local training. The update that leaves the
device is built by `edgeperso.federation`'s own `build_contribution`: deltas of trainable
persona/global parameters only (a user-level name is refused, a changed frozen LoRA A too),
clipped jointly, weighted, in the device's own persona block. Raw data and user parameters
have no path into a reply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat

from edgeperso import InvalidInputError, UnsupportedError
from edgeperso.federation import RoundTask
from edgeperso.federation._update import build_contribution
from edgeperso_federated.flower._records import (
    MODEL,
    PLAIN_ACTION,
    TASK,
    UPDATE,
    model_from_list,
    round_task,
    task_layout,
)


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
    """What local training produced, in persona/global parameters only."""

    before: Mapping[str, np.ndarray]  # task.params_for(persona): what training started from
    after: Mapping[str, np.ndarray]  # the same names after training
    summary: np.ndarray  # [summary_dim] the user-summary vector; picks the persona
    num_examples: int  # >= 1; sets the weight when the round has a weight_cap


Train = Callable[[RoundTask, Context], LocalUpdate]


def client_app(train: Train, *, allow_plain_rounds: bool = False) -> ClientApp:
    """A ClientApp for both kinds of round: SecAgg+ ("train", under Flower's secaggplus_mod)
    and plain ("train.plain"). An exception in `train` is this device dropping out.

    A plain round sends the device's update (and its user summary) unmasked: the device
    takes part only with `allow_plain_rounds=True`, as `FederationConfig` has it."""
    if not isinstance(allow_plain_rounds, bool):
        raise InvalidInputError("allow_plain_rounds must be True or False")
    app = ClientApp()
    # Without the optional Flower extra, mypy sees untyped decorators.

    @app.train(mods=[secaggplus_mod])  # type: ignore[untyped-decorator, unused-ignore]
    def secure(msg: Message, context: Context) -> Message:
        fit_ins = recorddict_compat.recorddict_to_fitins(msg.content, keep_input=True)
        layout = task_layout(fit_ins.config)
        model = model_from_list(layout, parameters_to_ndarrays(fit_ins.parameters))
        vector = _contribution(train, round_task(fit_ins.config, model), context)
        # Flower weights each device by num_examples in the clear; 1 for all reveals nothing.
        fit_res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([vector]), 1, {})
        return Message(recorddict_compat.fitres_to_recorddict(fit_res, False), reply_to=msg)

    @app.train(PLAIN_ACTION)  # type: ignore[untyped-decorator, unused-ignore]
    def plain(msg: Message, context: Context) -> Message:
        if not allow_plain_rounds:  # Flower reports the exception as this node's failure
            raise UnsupportedError(
                "this device takes part in secure rounds only: its update would reach the "
                "server unmasked; build the ClientApp with client_app(train, "
                "allow_plain_rounds=True) to take part in plain rounds"
            )
        values = dict(msg.content.config_records[TASK])
        arrays = msg.content.array_records[MODEL]
        model = {name: array.numpy() for name, array in arrays.items()}
        vector = _contribution(train, round_task(values, model), context)
        update = ArrayRecord({UPDATE: Array(vector.astype(np.float32))})
        return Message(RecordDict({UPDATE: update}), reply_to=msg)

    return app


def _contribution(train: Train, task: RoundTask, context: Context) -> np.ndarray:
    update = train(task, context)
    if not isinstance(update, LocalUpdate):
        raise InvalidInputError(f"train must return a LocalUpdate, not {type(update).__name__}")
    vector, _ = build_contribution(
        task, update.before, update.after, update.summary, update.num_examples
    )
    return vector  # [layout.length] float64
