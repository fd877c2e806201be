"""The global head's logistic regression."""

from __future__ import annotations

import numpy as np

from edgeperso.evaluate._head import fit_logistic


def test_logistic_regression_separates_separable_classes_with_unscaled_features() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 3.0, 5.0]])
    labels = rng.integers(0, 3, 300)
    x = (centers[labels] + rng.normal(scale=0.5, size=(300, 3))) * [1.0, 100.0, 0.01]
    w, b = fit_logistic(x.astype(np.float32), labels, 3, l2=1e-4, steps=300, class_weighting=True)
    assert w.shape == (3, 3) and b.shape == (3,) and w.dtype == np.float32
    assert np.mean((x @ w + b).argmax(1) == labels) > 0.97


def test_class_weighting_recovers_a_rare_class() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.1).astype(np.int64)
    x = (labels[:, None] * 1.0 + rng.normal(scale=0.8, size=(400, 2))).astype(np.float32)
    plain = fit_logistic(x, labels, 2, l2=1e-3, steps=300, class_weighting=False)
    weighted = fit_logistic(x, labels, 2, l2=1e-3, steps=300, class_weighting=True)
    recall = [np.mean((x @ w + b).argmax(1)[labels == 1] == 1) for w, b in (plain, weighted)]
    assert recall[1] > recall[0]
