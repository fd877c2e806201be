"""The global level: a linear head on base features of every training user's rows, its L2
strength (and, for classification, class weighting) chosen by cross-validation over users.

The folds hold out whole users, so a candidate is scored as the evaluation scores the
global model: per-user metric, averaged over users, on rows it was not fitted on. Only
training rows take part; the users' test rows are never seen before the final report.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

import numpy as np

from edgeperso.evaluate._config import EvalConfig
from edgeperso.runtime._head import fit_logistic, fit_ridge
from edgeperso.runtime._trainer import macro_f1

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GlobalHead:
    weights: np.ndarray  # [d, C] (classification) or [d, 1] (regression)
    bias: np.ndarray  # [C] or [1]
    l2: float
    class_weighting: bool | None  # None for regression
    selection: dict[str, Any]  # how the candidate was chosen, for the report


def fit_global_head(
    x: np.ndarray,  # [n, d] base features of the training rows
    target: np.ndarray,  # [n] int64 class indices or float64 scores
    users: np.ndarray,  # [n] the user of each row
    *,
    n_classes: int | None,  # None: regression
    l2_grid: tuple[float, ...],
    weighting_grid: tuple[bool, ...],
    steps: int,
    folds: int,
    seed: int,
) -> GlobalHead:
    """Cross-validate every (L2, class weighting) candidate over folds of users, refit the
    best on all rows. With one candidate, or one user, there is nothing to choose: the
    first candidate is fitted directly."""
    weightings: tuple[bool | None, ...] = weighting_grid if n_classes is not None else (None,)
    candidates = list(itertools.product(l2_grid, weightings))
    names = np.unique(users)
    k = min(folds, len(names))
    selection: dict[str, Any] = {"folds": k, "by": "user", "candidates": []}
    if len(candidates) == 1 or k < 2:
        chosen = candidates[0]
        selection["reason"] = (
            "one candidate" if len(candidates) == 1 else "one training user: nothing to hold out"
        )
    else:
        fold = user_folds(users, k, seed)
        per_user_rows = [np.flatnonzero(users == name) for name in names]
        scores = []
        for l2, weighting in candidates:
            score = _cross_validate(
                x, target, per_user_rows, fold, k, n_classes, l2, weighting, steps
            )
            scores.append(score)
            selection["candidates"].append(
                {"l2": l2, "class_weighting": weighting, "cv_score": score}
            )
        # macro-F1 is maximised, MAE minimised; the first of equal candidates wins
        best = int(np.argmax(scores) if n_classes is not None else np.argmin(scores))
        chosen = candidates[best]
        selection["metric"] = "macro_f1" if n_classes is not None else "mae"
        log.info("global head: l2=%g class_weighting=%s by %d-fold CV", *chosen, k)
    w, b = _fit(x, target, n_classes, chosen[0], chosen[1], steps)
    return GlobalHead(w, b, chosen[0], chosen[1], selection)


def configured_global_head(
    x: np.ndarray, target: np.ndarray, users: np.ndarray, n_classes: int | None, config: EvalConfig
) -> GlobalHead:
    """`fit_global_head` with an evaluation's grids, steps, folds and seed."""
    return fit_global_head(
        x,
        target,
        users,
        n_classes=n_classes,
        l2_grid=config.head_l2,
        weighting_grid=config.head_class_weighting,
        steps=config.head_steps,
        folds=config.head_folds,
        seed=config.seed,
    )


def user_folds(users: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[n] fold index in [0, k) per row: users shuffled, then dealt round-robin, so every
    row of a user lands in the same fold and fold sizes differ by at most one user."""
    rng = np.random.default_rng([seed, 0x67])  # a stream of its own, apart from the split
    names = rng.permutation(np.unique(users)).tolist()
    fold_of = dict(zip(names, itertools.cycle(range(k))))
    return np.array([fold_of[u] for u in users.tolist()], np.int64)


def _cross_validate(
    x: np.ndarray,
    target: np.ndarray,
    per_user_rows: list[np.ndarray],  # each user's row indices
    fold: np.ndarray,
    k: int,
    n_classes: int | None,
    l2: float,
    weighting: bool | None,
    steps: int,
) -> float:
    """Mean over users of the held-out per-user metric, each user predicted by the head
    fitted without its fold."""
    predicted = np.zeros(len(target), target.dtype)
    for f in range(k):
        held = fold == f
        w, b = _fit(x[~held], target[~held], n_classes, l2, weighting, steps)
        out = x[held] @ w + b
        predicted[held] = out.argmax(1) if n_classes is not None else out[:, 0]
    if n_classes is not None:
        per_user = [macro_f1(target[rows], predicted[rows]) for rows in per_user_rows]
    else:
        per_user = [
            float(np.mean(np.abs(predicted[rows] - target[rows]))) for rows in per_user_rows
        ]
    return float(np.mean(per_user))


def _fit(
    x: np.ndarray,
    target: np.ndarray,
    n_classes: int | None,
    l2: float,
    weighting: bool | None,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    if n_classes is None:
        return fit_ridge(x, target, l2)
    return fit_logistic(x, target, n_classes, l2=l2, steps=steps, class_weighting=bool(weighting))
