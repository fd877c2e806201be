"""The coordinator's round logic without its database: one model, one RoundConfig, one ledger.

Both Flower strategies (plain rounds on the Message API, secure rounds through Flower's
SecAgg+ workflow) hand their replies here, and everything after that is the coordinator's own
code: norm bounds and trimmed means for plain uploads, DP-FedAvg noise on the sum, per-persona
means, the next model, and the dp-accounting epsilon of each published round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.common import Scalar

from edgeperso import BudgetExhaustedError, InvalidInputError
from edgeperso.federation import PersonaLayout
from edgeperso_federated import _aggregate, _privacy
from edgeperso_federated._config import RoundConfig
from edgeperso_federated._rounds import _check_plain
from edgeperso_federated.flower._records import check_model, task_config

logger = logging.getLogger(__name__)


_MODULUS_BITS = 32  # Flower's default modulus_range, 2**32


def quantization_range(cohort: int) -> int:
    """Flower's SecAgg+ quantizes each value to [0, q] and sums `cohort` of them, plus a weight
    factor of q each, modulo 2**32: the largest power of two q whose sums cannot wrap."""
    return 1 << math.floor(math.log2((2**_MODULUS_BITS - 1) / cohort))


@dataclasses.dataclass(frozen=True)
class PublishedRound:
    server_round: int
    model_version: int
    survivors: int
    epsilon: float | None  # cumulative, at the rounds' delta; None without a privacy budget
    model: Mapping[str, np.ndarray]


class FlowerRounds:
    """Rounds of one app on Flower: the current model, its version and its privacy ledger.

    `epsilon_budget`/`delta` are the app's (as `POST /v1/admin/apps` takes them); `spent`
    lists the (noise_multiplier, sampling_probability) of rounds already published, so that a
    restarted ServerApp keeps counting. `on_publish` sees every new model (persist it there).
    DP noise comes from the operating system's CSPRNG; `seed` replaces it with a seeded numpy
    draw so that a simulation's published models can be reproduced (tests only: a known seed
    lets anyone subtract the noise).
    """

    def __init__(
        self,
        model: Mapping[str, np.ndarray],
        layout: PersonaLayout,
        config: RoundConfig,
        *,
        epsilon_budget: float | None = None,
        delta: float = 1e-6,
        spent: Iterable[tuple[float, float]] = (),
        seed: int | None = None,
        on_publish: Callable[[PublishedRound], None] | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise InvalidInputError("delta must be in (0, 1); 1/population or smaller is usual")
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise InvalidInputError("epsilon_budget must be positive (or None: no DP budget)")
        if epsilon_budget is not None and config.noise_multiplier <= 0:
            raise InvalidInputError("this app has a privacy budget: set noise_multiplier > 0")
        self.layout = layout
        self.config = config
        self.model = check_model(layout, model)
        self.version = config.model_version
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.spent: list[tuple[float, float]] = list(spent)
        self.published: list[PublishedRound] = []
        self._rng = None if seed is None else np.random.default_rng(seed)
        self._on_publish = on_publish

    def open_round(self, server_round: int) -> dict[str, Scalar]:
        """The task of the next round; refused when it would overspend the privacy budget."""
        projected = self._epsilon([*self.spent, self._event])
        if (
            projected is not None
            and self.epsilon_budget is not None
            and projected > self.epsilon_budget
        ):
            raise BudgetExhaustedError(
                f"this round would bring epsilon to {projected:.3f}, over the app's budget "
                f"{self.epsilon_budget}; no further rounds can run for this app"
            )
        round_id = f"{self.config.app_id}/{server_round}"
        return task_config(self.layout, self.config, round_id, self.version)

    def publish_sum(self, server_round: int, total: np.ndarray, survivors: int) -> PublishedRound:
        """A secure round: `total` [L] is the survivors' summed contribution vectors."""
        noisy = _aggregate.add_noise(total, self.config, self._rng)
        # SecAgg+ rounds each value stochastically to a step of 2 x value_bound / q: one
        # device's weight of exactly 1 comes back a few 1e-9 below it about one time in five.
        step = 2 * self.config.value_bound / quantization_range(self.config.cohort_size)
        means = _aggregate.means_of_sum(
            noisy, self.layout, self.config, weight_error=survivors * step
        )
        return self._publish(server_round, means, survivors)

    def publish_plain(self, server_round: int, vectors: Sequence[np.ndarray]) -> PublishedRound:
        """A plain round: individual uploads [L], norm-bounded, then mean or trimmed mean."""
        bounded = [_aggregate.bound_norm(v, self.layout, self.config) for v in vectors]
        if self.config.aggregator == "trimmed_mean":
            means = _aggregate.trimmed_means(np.stack(bounded), self.layout, self.config)
        else:
            noisy = _aggregate.add_noise(np.sum(bounded, axis=0), self.config, self._rng)
            means = _aggregate.means_of_sum(noisy, self.layout, self.config)
        return self._publish(server_round, means, len(vectors))

    def check_plain(self, vector: np.ndarray) -> np.ndarray:
        """A plain upload as float64 [L], or InvalidInputError saying what is wrong with it."""
        if vector.shape != (self.layout.length,) or not np.all(np.isfinite(vector)):
            raise InvalidInputError(
                f"an update must be {self.layout.length} finite numbers, got shape {vector.shape}"
            )
        out = vector.astype(np.float64)
        _check_plain(out, self.layout, self.config)
        return out

    def _publish(
        self, server_round: int, means: _aggregate.Means, survivors: int
    ) -> PublishedRound:
        self.model = _aggregate.next_model(self.model, self.layout, means, self.config)
        self.version += 1
        self.spent.append(self._event)
        published = PublishedRound(
            server_round, self.version, survivors, self._epsilon(self.spent), self.model
        )
        self.published.append(published)
        logger.info(
            "round %s published model version %d (%d survivors, epsilon %s)",
            server_round,
            self.version,
            survivors,
            published.epsilon,
        )
        if self._on_publish is not None:
            self._on_publish(published)
        return published

    @property
    def _event(self) -> tuple[float, float]:
        return (self.config.noise_multiplier, self.config.sampling_probability)

    def _epsilon(self, rounds: list[tuple[float, float]]) -> float | None:
        if self.epsilon_budget is None:
            return None
        return _privacy.epsilon(rounds, self.delta)
