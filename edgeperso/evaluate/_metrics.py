"""Per-user metrics and their summaries over users, in numpy (no scikit-learn on devices)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgeperso._errors import InvalidInputError


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes present in truth or prediction
    (scikit-learn's `f1_score(average="macro")`); a class never predicted correctly scores 0."""
    truth, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    _check_pair(truth, pred)
    scores = []
    for c in sorted(set(truth.tolist()) | set(pred.tolist())):
        tp = int(np.sum((truth == c) & (pred == c)))
        fp = int(np.sum((truth != c) & (pred == c)))
        fn = int(np.sum((truth == c) & (pred != c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    truth, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    _check_pair(truth, pred)
    return float(np.mean(truth == pred))


def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    truth, pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    _check_pair(truth, pred)
    return float(np.mean(np.abs(truth - pred)))


def _check_pair(truth: np.ndarray, pred: np.ndarray) -> None:
    if truth.shape != pred.shape or truth.ndim != 1:
        raise InvalidInputError("y_true and y_pred must be 1-D and of the same length")
    if len(truth) == 0:
        raise InvalidInputError("a metric needs at least one example")


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, resampling the values (users)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)  # [resamples]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def worst_decile(gains: Mapping[str, float]) -> list[tuple[str, float]]:
    """The worst tenth of users by gain (at least one), worst first; ties by user id."""
    if not gains:
        return []
    ranked = sorted(gains.items(), key=lambda item: (item[1], item[0]))
    return ranked[: max(1, math.ceil(len(ranked) / 10))]


@dataclasses.dataclass(frozen=True)
class GainSummary:
    """One metric over the evaluated users. `gain` is oriented so that positive is better:
    personal - global for F1 and accuracy, global - personal for MAE."""

    metric: str
    users: int
    global_mean: float
    global_median: float
    personal_mean: float
    personal_median: float
    gain_mean: float
    gain_median: float
    gain_ci95: tuple[float, float]
    share_worse: float  # users whose gain < 0
    share_better: float  # users whose gain > 0
    worst_decile_mean_gain: float
    worst_decile: tuple[tuple[str, float], ...]  # (user, gain), worst first


def summarize(
    metric: str,
    global_scores: Mapping[str, float],
    personal_scores: Mapping[str, float],
    *,
    lower_is_better: bool = False,
    resamples: int = 2000,
    seed: int = 0,
) -> GainSummary:
    users = sorted(global_scores)
    if set(users) != set(personal_scores):
        raise InvalidInputError("global and personal scores must cover the same users")
    g = np.array([global_scores[u] for u in users], np.float64)
    p = np.array([personal_scores[u] for u in users], np.float64)
    gain = g - p if lower_is_better else p - g
    worst = worst_decile(dict(zip(users, gain.tolist(), strict=True)))
    empty = len(users) == 0

    def stat(fn: Callable[[np.ndarray], Any], x: np.ndarray) -> float:
        return math.nan if empty else float(fn(x))

    return GainSummary(
        metric=metric,
        users=len(users),
        global_mean=stat(np.mean, g),
        global_median=stat(np.median, g),
        personal_mean=stat(np.mean, p),
        personal_median=stat(np.median, p),
        gain_mean=stat(np.mean, gain),
        gain_median=stat(np.median, gain),
        gain_ci95=bootstrap_ci(gain.tolist(), resamples=resamples, seed=seed),
        share_worse=stat(lambda x: np.mean(x < 0), gain),
        share_better=stat(lambda x: np.mean(x > 0), gain),
        worst_decile_mean_gain=math.nan if empty else float(np.mean([v for _, v in worst])),
        worst_decile=tuple(worst),
    )
