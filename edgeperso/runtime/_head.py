"""Linear read-outs fitted in numpy on frozen features: the global head (by the evaluator)
and a user's head delta on top of the shared model (the first stage of on-device training).

Both are convex problems on at most a few thousand rows, so they are solved to convergence in
milliseconds rather than by the train graph's stochastic steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeperso._errors import InvalidInputError

if TYPE_CHECKING:
    from edgeperso.runtime._trainer import TrainConfig


def fit_logistic(
    features: np.ndarray,  # [n, d] float32
    labels: np.ndarray,  # [n] int64 in [0, n_classes)
    n_classes: int,
    *,
    l2: float,
    steps: int,
    class_weighting: bool,
    offset: np.ndarray | None = None,  # [n, C] logits the fitted ones are added to
) -> tuple[np.ndarray, np.ndarray]:
    """W [d, C] and b [C] minimising the (class-weighted) mean cross-entropy of
    softmax(offset + x W + b) + l2/2 ||W||^2; with an offset, W and b are a delta on the model
    that produced it, pulled toward zero (toward that model) by the L2 term.

    Features are standardised for conditioning (the L2 term acts on the standardised
    weights) and the scaling is folded back into W and b. Nesterov's accelerated gradient
    with step 1/L, L an upper bound of the loss's curvature, and adaptive restart.
    """
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise InvalidInputError("features must be [n, d] with one label per row, n > 0")
    x = features.astype(np.float64)
    mean, std = x.mean(0), _usable_std(x)
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # [n, d+1], last column: bias
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if class_weighting:
        per_class = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
        w = per_class[labels]
    else:
        w = np.ones(len(labels))
    w /= w.sum()  # [n], sums to 1
    onehot = np.eye(n_classes)[labels]  # [n, C]
    # The softmax cross-entropy's Hessian is at most 1/2 in every direction of the logits.
    curvature = 0.5 * float(np.linalg.eigvalsh((z * w[:, None]).T @ z)[-1]) + l2
    step = 1.0 / curvature
    reg = np.ones((z.shape[1], 1))
    reg[-1] = 0.0  # the bias is not penalised

    base = np.zeros((len(x), n_classes)) if offset is None else offset.astype(np.float64)

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = base + z @ theta
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        loss = -float((w * (onehot * logp).sum(1)).sum()) + 0.5 * l2 * float((reg * theta**2).sum())
        grad = z.T @ ((np.exp(logp) - onehot) * w[:, None]) + l2 * reg * theta
        return loss, grad

    theta = np.zeros((z.shape[1], n_classes))
    velocity_point, t, last = theta.copy(), 1.0, np.inf
    for _ in range(steps):
        loss, grad = loss_grad(velocity_point)
        new = velocity_point - step * grad
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        if loss > last:  # restart the momentum when it overshoots
            t_next, new = 1.0, theta - step * loss_grad(theta)[1]
        velocity_point = new + (t - 1) / t_next * (new - theta)
        theta, t, last = new, t_next, loss
    weights = theta[:-1] / std[:, None]  # [d, C]
    bias = theta[-1] - mean @ weights  # [C]
    return weights.astype(np.float32), bias.astype(np.float32)


def _usable_std(x: np.ndarray) -> np.ndarray:
    """Per-column standard deviations for standardising, with (near-)constant columns set
    to infinity so that they get zero weight. Dividing by a tiny std instead (one int8
    MiniLM feature varies by ~5e-10) gives that column a weight of ~1e4: harmless to the
    predictions, but it dominates the weights' norm, which federated clipping then scales
    down with everything the user learnt."""
    std = x.std(0)
    return np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, np.inf)


def fit_ridge(
    x: np.ndarray, y: np.ndarray, l2: float, offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """W [d, 1], b [1] minimising mean (offset + x W + b - y)^2 + l2 ||W||^2 on standardised
    features (the bias is not penalised); closed form."""
    mean_x = x.mean(0)
    std = _usable_std(x.astype(np.float64))
    z = ((x - mean_x) / std).astype(np.float64)
    target = y.astype(np.float64) - (0.0 if offset is None else offset.astype(np.float64))
    gram = z.T @ z / len(x) + l2 * np.eye(x.shape[1])
    w = np.linalg.solve(gram, z.T @ (target - target.mean()) / len(x)) / std
    bias = target.mean() - mean_x @ w
    return w[:, None].astype(np.float32), np.array([bias], np.float32)


def knn_mix(
    logits: np.ndarray,  # [n, C] the model's outputs for the queries
    queries: np.ndarray,  # [n, d] the queries' text features
    keys: np.ndarray,  # [m, d] the user's labelled examples' features, rows of unit norm
    labels: np.ndarray,  # [m] int64 in [0, C)
    k: int,
    weight: float,
) -> np.ndarray:
    """[n, C] log of (1 - weight) * softmax(logits) + weight * (label shares among the k most
    cosine-similar of the user's examples): a retrieval signal from the user's own history,
    as log-probabilities so that softmax gives the mixture back."""
    q = queries.astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    similarity = q @ keys.astype(np.float64).T  # [n, m]
    k = min(k, keys.shape[0])
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [n, k], any order
    votes = np.zeros(logits.shape, np.float64)
    for c in range(logits.shape[1]):
        votes[:, c] = (labels[nearest] == c).mean(1)
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(1, keepdims=True)
    mixed: np.ndarray = np.log((1 - weight) * probs + weight * votes + 1e-12)
    return mixed


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): the keys knn_mix compares queries with."""
    out = x.astype(np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def fit_head_delta(
    features: np.ndarray,  # [n, d]
    shared_out: np.ndarray,  # [n, C] the shared model's outputs for these rows
    labels: np.ndarray | None,  # [n] int64 for classification; None: regression
    targets: np.ndarray,  # [n, C] float scores (used for regression)
    n_classes: int,
    l2: float,
    class_weighting: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """A user's head delta (W [d, C], b [C]) on top of the shared model's outputs."""
    if labels is None:
        return fit_ridge(features, targets[:, 0], l2, offset=shared_out[:, 0])
    return fit_logistic(
        features,
        labels,
        n_classes,
        l2=l2,
        steps=200,
        class_weighting=class_weighting,
        offset=shared_out,
    )


def stage1_candidates(
    features: np.ndarray,  # [n, d]
    shared_out: np.ndarray,  # [n, C]
    labels: np.ndarray | None,
    targets: np.ndarray,
    n_classes: int,
    parts: list[np.ndarray],  # the folds' row indices
    config: TrainConfig,
) -> Iterator[tuple[tuple[str, Any], np.ndarray]]:
    """(candidate, its out-of-fold outputs for every row): a head delta for each strength in
    `config.head_l2`, then, for classification, the retrieval mix for each k and weight
    (each fold's rows retrieve only from the other folds)."""
    every = np.arange(len(features))
    for l2 in config.head_l2:
        predicted = np.zeros_like(shared_out)
        for held in parts:
            rest = np.setdiff1d(every, held)
            w, b = fit_head_delta(
                features[rest],
                shared_out[rest],
                None if labels is None else labels[rest],
                targets[rest],
                n_classes,
                l2,
                config.class_weighting,
            )
            predicted[held] = shared_out[held] + features[held] @ w + b
        yield ("head", l2), predicted
    if labels is None:
        return
    keys = unit_rows(features)
    for k in config.knn_k:
        for weight in config.knn_weight:
            predicted = np.zeros_like(shared_out)
            for held in parts:
                rest = np.setdiff1d(every, held)
                predicted[held] = knn_mix(
                    shared_out[held], features[held], keys[rest], labels[rest], k, weight
                )
            yield ("knn", (k, float(weight))), predicted
