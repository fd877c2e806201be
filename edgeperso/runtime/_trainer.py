"""On-device training of a user's parameters: the bundle's train-step graph + numpy AdamW.

The graph returns the loss and one gradient per parameter; the optimizer, clipping and
schedule run here. Only user-level parameters move; persona and global ones are fed as they
are, and a Ditto term pulls the user's deltas toward zero (toward the shared model).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from edgeperso._errors import InvalidInputError

Params = dict[str, np.ndarray]


_INT_FIELDS = ("folds", "epochs", "min_steps", "max_steps", "max_examples", "seed")
_NUMBER_FIELDS = (
    "learning_rate",
    "weight_decay",
    "warmup_fraction",
    "max_grad_norm",
    "prox_weight",
    "holdout_fraction",
    "max_seconds",
    "selection_se",
)
_OPTIONAL_FIELDS = ("max_seconds", "max_steps", "max_examples")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a user's parameters are trained. Budgets stop training early; the best epoch on
    the held-out slice is kept either way."""

    # Stage 1, the head: a delta on the shared read-out, fitted exactly in numpy on the
    # frozen features; the strength of its pull toward the shared head is picked by k-fold
    # cross-validation over all the user's examples, against the shared model itself.
    head_l2: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    folds: int = 5
    # A kept candidate or adapter must beat the floor by this many SEs. 2.0 is the smallest
    # threshold that made at most 10% of users worse on all six shared data sets when chosen
    # on training rows only (benchmarks/nested_selection.py; docs/evaluate.md).
    selection_se: float = 2.0
    # Stage 1 also tries retrieval (classification): the shared model's probabilities mixed
    # with the labels of the k most similar of the user's own examples, for each k and
    # weight here, cross-validated the same way. Empty tuples turn it off.
    knn_k: tuple[int, ...] = (5, 15)
    knn_weight: tuple[float, ...] = (0.3, 0.6)
    # Stage 2, the adapter: LoRA, user embedding and head trained with the bundle's train
    # graph from the stage-1 head, kept only when it beats that head on a held-out slice.
    # Off by default: it costs ~100 train steps (seconds to a minute on 2 cores) and, on
    # StudEmo, did not win reliably over the head alone (README, Benchmarks).
    adapter: bool = False
    epochs: int = 10
    min_steps: int = 100  # small users get at least this many steps (cycling their data)
    learning_rate: float = 1e-2
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # linear warm-up, then cosine decay to zero
    max_grad_norm: float = 1.0  # global-norm clipping
    prox_weight: float = 1e-3  # Ditto: pull toward the persona/global model
    holdout_fraction: float = 0.2  # picks the stopping epoch and guards against regressions
    class_weighting: bool = True  # inverse-frequency weights for imbalanced labels
    max_seconds: float | None = 60.0
    max_steps: int | None = None
    max_examples: int | None = 5000  # the most recent ones are used
    seed: int = 0

    def __post_init__(self) -> None:
        # Types first, so that a wrong type is an InvalidInputError rather than a TypeError.
        for name in _INT_FIELDS + _NUMBER_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            kind = int if name in _INT_FIELDS else int | float
            if isinstance(value, bool) or not isinstance(value, kind) or value != value:
                what = "an int" if name in _INT_FIELDS else "a number (not NaN)"
                raise InvalidInputError(f"TrainConfig.{name} must be {what}")
        for name in ("class_weighting", "adapter"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"TrainConfig.{name} must be a bool")
        grid = self.head_l2
        if isinstance(grid, list):  # e.g. a config read back from JSON
            grid = tuple(grid)
            object.__setattr__(self, "head_l2", grid)
        if (
            not isinstance(grid, tuple)
            or not grid
            or not all(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v > 0
                for v in grid
            )
        ):
            raise InvalidInputError(
                "TrainConfig.head_l2 must be a non-empty tuple of finite numbers > 0"
            )
        for name in ("knn_k", "knn_weight"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.knn_k, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.knn_k
        ):
            raise InvalidInputError("TrainConfig.knn_k must be a tuple of ints >= 1 (or empty)")
        if not isinstance(self.knn_weight, tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
            for v in self.knn_weight
        ):
            raise InvalidInputError(
                "TrainConfig.knn_weight must be a tuple of numbers in (0, 1] (or empty)"
            )
        if self.folds < 2:
            raise InvalidInputError("TrainConfig.folds must be >= 2")
        for name in ("epochs", "min_steps", "learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"TrainConfig.{name} must be > 0")
        for name in ("learning_rate", "weight_decay", "prox_weight", "selection_se"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidInputError(f"TrainConfig.{name} must be finite")
        for name in ("weight_decay", "prox_weight", "selection_se"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"TrainConfig.{name} must be >= 0")
        if not 0 <= self.warmup_fraction < 1:
            raise InvalidInputError("TrainConfig.warmup_fraction must be in [0, 1)")
        if not 0 < self.holdout_fraction < 1:
            raise InvalidInputError("TrainConfig.holdout_fraction must be in (0, 1)")
        for name in ("max_seconds", "max_steps", "max_examples"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidInputError(f"TrainConfig.{name} must be > 0 or None")
        if self.seed < 0:
            raise InvalidInputError("TrainConfig.seed must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainProgress:
    """One optimizer step of the adapter stage (or of train_shared), passed to on_progress:
    the step and the planned total, the epoch, the micro-batch loss and seconds since start.
    The head stage is a closed-form fit and reports no steps."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a train() call did. `kept` is "personal" only when the user's parameters beat
    the shared model on data they were not fitted on (cross-validation folds for the head, a
    held-out slice for the adapter); otherwise the user keeps the shared model and `reason`
    says why. `global_score` and `personal_score` are those held-out figures; `stage` says
    which stage produced the kept parameters."""

    kept: Literal["personal", "global"]
    stage: Literal["global", "head", "knn", "adapter"]
    reason: str
    # retrieval_macro_f1 (embedding bundles): each held-out text takes the group of its
    # most similar training text; macro-F1 of those groups
    metric: Literal["macro_f1", "mae", "retrieval_macro_f1"]
    global_score: float
    personal_score: float
    head_l2: float | None  # the cross-validated strength of the head's pull (None: no head)
    knn: tuple[int, float] | None  # (k, weight) of the kept retrieval mix (None: none)
    examples: int
    holdout: int  # examples held out from the adapter stage (0 when it did not run)
    steps: int  # adapter train steps (0 when it did not run)
    epochs: float
    seconds: float
    stopped: Literal["completed", "max_seconds", "max_steps", "cancelled"]
    truncated_texts: int
    resumed_from_step: int
    adapter_bytes: int


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW."""

    def __init__(self, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.weight_decay = weight_decay
        self.b1, self.b2 = betas
        self.eps = 1e-8
        self.t = 0
        self.m: Params = {}
        self.v: Params = {}

    def step(self, params: Params, grads: Mapping[str, np.ndarray], lr: float) -> None:
        self.t += 1
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        for name, g in grads.items():
            p = params[name]
            m = self.m.setdefault(name, np.zeros_like(p))
            v = self.v.setdefault(name, np.zeros_like(p))
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p *= 1 - lr * self.weight_decay
            p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)

    def state(self) -> Params:
        out = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return out | {"t": np.array(self.t, np.int64)}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        self.m = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("v.")}


def clip_by_global_norm(grads: Params, max_norm: float) -> float:
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for g in grads.values():
            g *= scale
    return norm


class Schedule(Protocol):
    """What the schedule reads: TrainConfig and SharedTrainConfig both have it."""

    @property
    def learning_rate(self) -> float: ...

    @property
    def warmup_fraction(self) -> float: ...


def learning_rate(config: Schedule, step: int, total: int) -> float:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to zero."""
    warmup = max(1, int(config.warmup_fraction * total))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def split_holdout(
    labels: Sequence[int] | None, n: int, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out indices; stratified by class when labels are given, so that a rare
    class is represented in both when it has two examples or more."""
    order = rng.permutation(n)
    if labels is None:
        k = _held_count(n, fraction)
        return np.sort(order[k:]), np.sort(order[:k])
    held: list[int] = []
    for cls in sorted(set(labels)):
        members = [i for i in order if labels[i] == cls]
        held += members[: _held_count(len(members), fraction)]
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    return np.array(train, np.int64), np.array(sorted(held), np.int64)


def stratified_folds(
    labels: Sequence[int] | None, n: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """[n] fold index in [0, k) per example, each class dealt round-robin over the folds."""
    k = min(k, n)
    folds = np.zeros(n, np.int64)
    groups = [rng.permutation(n)] if labels is None else []
    if labels is not None:
        order = rng.permutation(n)
        groups = [np.array([i for i in order if labels[i] == c]) for c in sorted(set(labels))]
    dealt = 0
    for members in groups:
        for j, i in enumerate(members):
            folds[i] = (dealt + j) % k
        dealt += len(members)
    return folds


def clear_advantage(advantage: np.ndarray, selection_se: float) -> bool:
    """Stage 1's rule: a candidate's per-fold advantage over the shared model (higher is
    better) must average more than `selection_se` standard errors of itself, not merely be
    positive, so that fold-to-fold noise does not pick one that is worse on new texts."""
    error = advantage.std(ddof=1) / math.sqrt(len(advantage)) if len(advantage) > 1 else 0.0
    return bool(advantage.mean() > selection_se * error)


def _held_count(n: int, fraction: float) -> int:
    """About `fraction` of `n`, but at least one and never all: both sides stay non-empty."""
    return min(n - 1, max(1, round(fraction * n)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the classes present in truth or prediction (as scikit-learn does)."""
    classes = np.union1d(y_true, y_pred)
    scores = []
    for c in classes:
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        fp = float(np.sum((y_true != c) & (y_pred == c)))
        fn = float(np.sum((y_true == c) & (y_pred != c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def class_weights(labels: np.ndarray, n_classes: int, enabled: bool) -> np.ndarray:
    if not enabled:
        return np.ones(n_classes, np.float32)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = max(1, int((counts > 0).sum()))
    weights = np.where(counts > 0, len(labels) / (present * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class Budget:
    """Wall-clock, step and cancellation limits, checked once per step."""

    def __init__(
        self, config: TrainConfig, cancel: Callable[[], bool] | None, clock_start: float
    ) -> None:
        self.config = config
        self.cancel = cancel
        self.start = clock_start

    def stop_reason(
        self, step: int
    ) -> Literal["completed", "max_seconds", "max_steps", "cancelled"] | None:
        if self.cancel is not None and self.cancel():
            return "cancelled"
        if self.config.max_steps is not None and step >= self.config.max_steps:
            return "max_steps"
        limit = self.config.max_seconds
        if limit is not None and time.perf_counter() - self.start >= limit:
            return "max_seconds"
        return None
