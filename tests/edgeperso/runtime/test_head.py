"""The numpy read-outs: the global head and a user's head delta on the shared model."""

from __future__ import annotations

import numpy as np

from edgeperso.runtime._head import fit_logistic, fit_ridge, knn_mix, unit_rows


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


def test_with_an_offset_the_fit_is_a_delta_pulled_toward_zero_by_l2() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    offset = np.stack([np.zeros(200), 3 * x[:, 0]], 1)  # already a good model
    w_strong, b_strong = fit_logistic(
        x, labels, 2, l2=1e4, steps=200, class_weighting=False, offset=offset
    )
    assert np.abs(w_strong).max() < 1e-3 and np.abs(b_strong).max() < 0.05
    flipped = 1 - labels  # the user disagrees with the offset model on every row
    w, b = fit_logistic(x, flipped, 2, l2=1e-4, steps=300, class_weighting=False, offset=offset)
    assert np.mean((offset + x @ w + b).argmax(1) == flipped) > 0.95


def test_ridge_with_an_offset_fits_the_residual() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 3))
    offset = x[:, 0] * 2.0
    y = offset + 0.5 * x[:, 1] - 1.0
    w, b = fit_ridge(x, y, 1e-6, offset=offset)
    np.testing.assert_allclose(w[:, 0], [0.0, 0.5, 0.0], atol=1e-3)
    np.testing.assert_allclose(b, [-1.0], atol=1e-3)


def test_a_near_constant_feature_gets_no_weight() -> None:
    # One int8 MiniLM feature varies by ~5e-10: standardising by that std must not give it a
    # huge weight (it would dominate the delta's norm that federated clipping scales down).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))  # float64, so that the tiny variation is really there
    x[:, 2] = 0.25 + 5e-10 * rng.normal(size=60)
    labels = (x[:, 0] > 0).astype(np.int64)

    w, _ = fit_logistic(x, labels, 2, l2=0.1, steps=200, class_weighting=True)
    w_ridge, _ = fit_ridge(x, x[:, 0], 0.1)

    assert np.all(w[2] == 0) and w_ridge[2, 0] == 0
    assert np.abs(w).max() < 10 and np.abs(w[0]).max() > 0.1


def test_knn_mix_is_the_stated_mixture() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    keys = unit_rows(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))
    labels = np.array([1, 1, 0])
    queries = np.array([[1.0, 0.05], [0.1, 1.0]])

    mixed = np.exp(knn_mix(logits, queries, keys, labels, k=2, weight=0.4))

    shared = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    votes = np.array([[0.0, 1.0], [0.5, 0.5]])  # nearest two: both 1s; then one 0, one 1
    np.testing.assert_allclose(mixed, 0.6 * shared + 0.4 * votes, atol=1e-9)
