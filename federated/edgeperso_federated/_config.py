"""Configuration as frozen, validated dataclasses: the service, and one round."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from edgeperso import InvalidInputError

MAX_NOISE_MULTIPLIER = 1000.0


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidInputError(what)


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    admin_token: str  # bearer token of the operator API
    database_url: str = "sqlite:///edgeperso-coordinator.db"
    max_body_bytes: int = 64 * 1024 * 1024  # larger requests are refused with 413
    device_rate_per_s: float = 20.0  # token bucket per device (long polls included)
    device_burst: int = 100
    enrol_rate_per_s: float = 5.0  # token bucket per client address for enrolment
    enrol_burst: int = 2000
    tick_s: float = 0.2  # how often stage deadlines are checked
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    def __post_init__(self) -> None:
        _require(len(self.admin_token) >= 16, "admin_token must have at least 16 characters")
        _require(self.max_body_bytes > 0, "max_body_bytes must be positive")
        _require(self.device_rate_per_s > 0 and self.device_burst >= 1, "device rate limit")
        _require(self.enrol_rate_per_s > 0 and self.enrol_burst >= 1, "enrolment rate limit")
        _require(self.sqlite_synchronous in ("NORMAL", "FULL"), "sqlite_synchronous")


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """What an operator asks for when opening a round for one model version of an app."""

    app_id: str
    model_version: int
    cohort_size: int  # joining closes when this many devices joined
    min_survivors: int  # fewer devices left at any stage: the round aborts, nothing published
    join_timeout_s: float = 60.0
    stage_timeout_s: float = 30.0
    secure: bool = True  # secure aggregation; off: plain uploads with robust aggregation
    target_dropout: float = 0.05  # sizes the SecAgg+ neighbourhood and threshold
    clip_norm: float = 1.0  # L2 bound of a device's deltas (clipped on the device)
    summary_clip: float = 1.0  # L2 bound of the user-summary vector (persona centroids)
    weight_cap: float | None = None  # examples for full weight; None: uniform weights
    noise_multiplier: float = 0.0  # Gaussian noise std / sensitivity; 0: no DP
    sampling_probability: float = 1.0  # cohort / eligible population, for the accountant
    aggregator: Literal["mean", "trimmed_mean"] = "mean"
    trim_fraction: float = 0.1  # trimmed off each end per coordinate (plain rounds only)
    server_lr: float = 1.0
    # A persona (and the global level) with less summed weight keeps its parameters. Each
    # device weighs at most 1, so this is also a least number of devices: at 1, a persona one
    # device chose was published as that device's own delta and summary.
    min_persona_weight: float = 3.0

    def __post_init__(self) -> None:
        _require(self.cohort_size >= 2, "cohort_size must be >= 2")
        _require(1 <= self.min_survivors <= self.cohort_size, "min_survivors in 1..cohort_size")
        _require(self.model_version >= 0, "model_version must be >= 0")
        for name in ("join_timeout_s", "stage_timeout_s", "clip_norm", "summary_clip", "server_lr"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, f"{name} must be positive")
        _require(0 <= self.target_dropout < 0.5, "target_dropout must be in [0, 0.5)")
        _require(
            math.isfinite(self.noise_multiplier)
            and 0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER,
            f"noise_multiplier must be in [0, {MAX_NOISE_MULTIPLIER:g}] (0: no DP; 0.5 to 5 is "
            "usual): more noise buries any cohort's update, and the accountant loses precision",
        )
        _require(0 < self.sampling_probability <= 1, "sampling_probability must be in (0, 1]")
        _require(
            self.weight_cap is None or (math.isfinite(self.weight_cap) and self.weight_cap >= 1),
            "weight_cap must be a number of examples >= 1 (or null: uniform weights); devices "
            "refuse a task with a smaller one",
        )
        _require(0 <= self.trim_fraction < 0.5, "trim_fraction must be in [0, 0.5)")
        _require(
            self.aggregator == "mean" or not self.secure,
            "trimmed_mean needs individual updates: use it only with secure=False",
        )
        _require(self.aggregator in ("mean", "trimmed_mean"), "aggregator: mean or trimmed_mean")
        _require(
            math.isfinite(self.min_persona_weight) and self.min_persona_weight > 0,
            "min_persona_weight must be positive",
        )
        _require(
            self.noise_multiplier == 0 or self.aggregator == "mean",
            "DP noise is calibrated for the mean aggregator",
        )

    @property
    def sensitivity(self) -> float:
        """L2 bound of one device's contribution: deltas, summary, weight <= 1."""
        return math.sqrt(self.clip_norm**2 + self.summary_clip**2 + 1.0)

    @property
    def value_bound(self) -> float:
        """Bound on any single coordinate a device contributes (for fixed-point headroom)."""
        return max(self.clip_norm, self.summary_clip, 1.0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundConfig:
        return cls(**data)
