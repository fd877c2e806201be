"""The global head fitted by multinomial logistic regression on base-model features."""

from __future__ import annotations

import numpy as np

from edgeperso._errors import InvalidInputError


def fit_logistic(
    features: np.ndarray,  # [n, d] float32
    labels: np.ndarray,  # [n] int64 in [0, n_classes)
    n_classes: int,
    *,
    l2: float,
    steps: int,
    class_weighting: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """W [d, C] and b [C] minimising the (class-weighted) mean cross-entropy + l2/2 ||W||^2.

    Features are standardised for conditioning (the L2 term acts on the standardised
    weights) and the scaling is folded back into W and b. Nesterov's accelerated gradient
    with step 1/L, L an upper bound of the loss's curvature, and adaptive restart.
    """
    if features.ndim != 2 or len(features) != len(labels) or len(labels) == 0:
        raise InvalidInputError("features must be [n, d] with one label per row, n > 0")
    x = features.astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-8
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

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = z @ theta
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
