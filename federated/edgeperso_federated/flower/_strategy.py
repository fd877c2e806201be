"""The two Flower strategies of an EdgePerso app, both over one `FlowerRounds`.

- `PlainStrategy` (Message API): individual float32 uploads, validated and norm-bounded, then
  mean (with DP noise) or coordinate-wise trimmed mean. Use it only where the coordinator
  may see individual clipped updates and persona membership.
- `SecAggStrategy` (the legacy strategy API, which is what Flower's `SecAggPlusWorkflow`
  drives): the workflow unmasks the survivors' mean contribution vector; the strategy turns
  it back into their sum, adds DP noise and publishes. It never sees an individual update.

`secaggplus_workflow` sizes Flower's SecAgg+ from the cohort and the target dropout with the
coordinator's `secagg_params`, instead of Flower's example values (3 shares, threshold 2).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from edgeperso import InvalidInputError, UnsupportedError
from edgeperso.federation import secagg_params
from edgeperso_federated._config import RoundConfig
from edgeperso_federated.flower._records import (
    MODEL,
    PLAIN_TRAIN,
    TASK,
    UPDATE,
    model_list,
    model_record,
)
from edgeperso_federated.flower._rounds import FlowerRounds, quantization_range

logger = logging.getLogger(__name__)


def secaggplus_workflow(config: RoundConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the neighbourhood and threshold the coordinator uses.

    Our k neighbours plus the device itself are Flower's `num_shares` (Flower keeps one share
    of each secret on its owner); the threshold t > (k + 1) / 2 still keeps the server from
    holding t shares of both secrets of one device. Values are clipped by Flower to
    [-value_bound, value_bound], which the device's clipping already guarantees.
    """
    if not config.secure:
        raise InvalidInputError("secaggplus_workflow is for secure rounds (secure=True)")
    if config.cohort_size < 3:
        raise InvalidInputError(
            "Flower's SecAgg+ needs a cohort of at least 3 devices (it refuses 2 shares); "
            "raise cohort_size or run a plain round"
        )
    params = secagg_params(config.cohort_size, config.target_dropout)
    return SecAggPlusWorkflow(
        num_shares=min(params.neighbours + 1, config.cohort_size),
        reconstruction_threshold=params.threshold,
        max_weight=1.0,  # every device reports weight 1 to Flower; its real weight is masked
        clipping_range=config.value_bound,
        quantization_range=quantization_range(config.cohort_size),
        timeout=config.stage_timeout_s,
    )


# The type: ignores are for mypy runs without the optional Flower extra (Flower is then Any).
class PlainStrategy(Strategy):  # type: ignore[misc, unused-ignore]
    """Plain EdgePerso rounds on Flower's Message API (the coordinator's `secure: false`)."""

    def __init__(self, rounds: FlowerRounds) -> None:
        if rounds.config.secure:
            raise InvalidInputError(
                "secure rounds run through Flower's SecAggPlusWorkflow: use run_rounds or "
                "server_app, or set secure=False for plain rounds"
            )
        self.rounds = rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """`arrays` is Flower's copy of the current model; `rounds.model` is the one used."""
        task = self.rounds.open_round(server_round)
        cohort = self.rounds.config.cohort_size
        nodes = _wait_for_nodes(grid, cohort, self.rounds.config.join_timeout_s)
        if len(nodes) < cohort:
            logger.warning(
                "round %s: only %d of %d nodes connected", server_round, len(nodes), cohort
            )
            return []
        content = RecordDict(
            {MODEL: model_record(self.rounds.model), TASK: ConfigRecord(dict(task))}
        )
        return [
            Message(content=content, dst_node_id=node, message_type=PLAIN_TRAIN)
            for node in random.sample(nodes, cohort)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        vectors: list[np.ndarray] = []
        for reply in replies:
            if reply.has_error():
                logger.info("round %s: a device dropped (%s)", server_round, reply.error.reason)
                continue
            try:
                record = reply.content.array_records[UPDATE]
                vectors.append(self.rounds.check_plain(record[UPDATE].numpy()))
            except (KeyError, InvalidInputError) as exc:
                logger.warning("round %s: an update was refused: %s", server_round, exc)
        if len(vectors) < self.rounds.config.min_survivors:
            logger.warning(
                "round %s aborted: %d usable updates, min_survivors is %d",
                server_round,
                len(vectors),
                self.rounds.config.min_survivors,
            )
            return None, None
        published = self.rounds.publish_plain(server_round, vectors)
        return model_record(published.model), MetricRecord({"survivors": published.survivors})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        config = self.rounds.config
        logger.info(
            "EdgePerso plain rounds: cohort %d, %s, clip %.3g, noise multiplier %.3g",
            config.cohort_size,
            config.aggregator,
            config.clip_norm,
            config.noise_multiplier,
        )


class SecAggStrategy(LegacyStrategy):  # type: ignore[misc, unused-ignore]
    """Secure EdgePerso rounds, driven by Flower's `SecAggPlusWorkflow`."""

    def __init__(self, rounds: FlowerRounds) -> None:
        if not rounds.config.secure:
            raise InvalidInputError("SecAggStrategy runs secure rounds: set secure=True")
        self.rounds = rounds

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(model_list(self.rounds.layout, self.rounds.model))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        task = self.rounds.open_round(server_round)
        cohort = self.rounds.config.cohort_size
        if not client_manager.wait_for(
            cohort, timeout=math.ceil(self.rounds.config.join_timeout_s)
        ):
            logger.warning("round %s: fewer than %d nodes connected", server_round, cohort)
            return []
        model = ndarrays_to_parameters(model_list(self.rounds.layout, self.rounds.model))
        fit_ins = FitIns(model, dict(task))
        return [(client, fit_ins) for client in client_manager.sample(cohort)]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        survivors = len(results)
        if survivors < self.rounds.config.min_survivors:
            logger.warning(
                "round %s aborted: %d survivors, min_survivors is %d",
                server_round,
                survivors,
                self.rounds.config.min_survivors,
            )
            return None, {}
        unmasked = results[0][1].parameters
        if any(res.parameters is not unmasked for _, res in results):
            raise UnsupportedError(
                "SecAggStrategy received individual updates: run it under Flower's "
                "SecAggPlusWorkflow (see secaggplus_workflow), never the default fit workflow"
            )
        (mean,) = parameters_to_ndarrays(unmasked)
        total = np.asarray(mean, dtype=np.float64) * survivors
        published = self.rounds.publish_sum(server_round, total, survivors)
        model = ndarrays_to_parameters(model_list(self.rounds.layout, published.model))
        return model, {"survivors": survivors}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return nodes
