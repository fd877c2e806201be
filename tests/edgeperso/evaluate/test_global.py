"""The global head's cross-validated choice of L2 strength and class weighting."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError
from edgeperso.evaluate import EvalConfig
from edgeperso.evaluate._global import configured_global_head, fit_global_head, user_folds
from edgeperso.runtime._head import fit_logistic, fit_ridge
from edgeperso.runtime._trainer import macro_f1


def users_data(
    n_users: int = 8, rows: int = 40, dim: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shared linear rule with label noise, rows grouped by user; class 1 is rare."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_users * rows, dim)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=len(x)) > 0.8).astype(np.int64)
    users = np.repeat([f"u{i}" for i in range(n_users)], rows)
    return x, y, users


def test_every_row_of_a_user_lands_in_one_fold_and_folds_are_balanced() -> None:
    _, _, users = users_data(n_users=7)
    fold = user_folds(users, 3, seed=0)
    for user in np.unique(users):
        assert len(set(fold[users == user].tolist())) == 1
    per_fold = [len(set(users[fold == f].tolist())) for f in range(3)]
    assert sorted(per_fold) == [2, 2, 3]
    assert np.array_equal(fold, user_folds(users, 3, seed=0))  # deterministic per seed


def test_the_chosen_candidate_is_the_best_cross_validated_one_and_is_refitted_on_all_rows() -> None:
    x, y, users = users_data()
    grid = (1e-3, 1.0, 30.0)
    head = fit_global_head(
        x, y, users, n_classes=2, l2_grid=grid, weighting_grid=(True, False),
        steps=300, folds=4, seed=0,
    )  # fmt: skip
    scores = {(c["l2"], c["class_weighting"]): c["cv_score"] for c in head.selection["candidates"]}
    assert set(scores) == {(l2, w) for l2 in grid for w in (True, False)}
    assert (head.l2, head.class_weighting) == max(scores, key=lambda c: scores[c])
    assert head.selection["folds"] == 4 and head.selection["metric"] == "macro_f1"
    w, b = fit_logistic(x, y, 2, l2=head.l2, steps=300, class_weighting=bool(head.class_weighting))
    np.testing.assert_array_equal(head.weights, w)
    np.testing.assert_array_equal(head.bias, b)


def test_a_cv_score_is_the_mean_per_user_macro_f1_on_users_the_head_was_not_fitted_on() -> None:
    x, y, users = users_data()
    head = fit_global_head(
        x, y, users, n_classes=2, l2_grid=(0.1,), weighting_grid=(True, False),
        steps=300, folds=4, seed=3,
    )  # fmt: skip
    fold = user_folds(users, 4, seed=3)
    predicted = np.zeros_like(y)
    for f in range(4):
        w, b = fit_logistic(x[fold != f], y[fold != f], 2, l2=0.1, steps=300, class_weighting=True)
        predicted[fold == f] = (x[fold == f] @ w + b).argmax(1)
    expected = np.mean([macro_f1(y[users == u], predicted[users == u]) for u in np.unique(users)])
    weighted = next(c for c in head.selection["candidates"] if c["class_weighting"])
    assert weighted["cv_score"] == pytest.approx(expected)


def test_regression_picks_the_lowest_mae_and_ignores_class_weighting() -> None:
    x, _, users = users_data()
    target = (x[:, 0] * 2.0 + np.random.default_rng(1).normal(size=len(x))).astype(np.float64)
    head = fit_global_head(
        x, target, users, n_classes=None, l2_grid=(1e-3, 10.0, 1e3), weighting_grid=(True,),
        steps=1, folds=5, seed=0,
    )  # fmt: skip
    maes = {c["l2"]: c["cv_score"] for c in head.selection["candidates"]}
    assert head.class_weighting is None and len(maes) == 3
    assert head.l2 == min(maes, key=lambda v: maes[v]) and head.selection["metric"] == "mae"
    assert maes[1e3] > maes[1e-3]  # shrinking a real signal away costs accuracy
    w, b = fit_ridge(x, target, head.l2)
    np.testing.assert_array_equal(head.weights, w)
    np.testing.assert_array_equal(head.bias, b)


def test_configured_global_head_uses_the_evaluation_config_grids_steps_folds_and_seed() -> None:
    x, y, users = users_data()
    config = EvalConfig(
        head_l2=(0.01, 3.0), head_class_weighting=(False,), head_steps=50, head_folds=3, seed=7
    )
    head = configured_global_head(x, y, users, 2, config)
    direct = fit_global_head(
        x, y, users, n_classes=2, l2_grid=(0.01, 3.0), weighting_grid=(False,),
        steps=50, folds=3, seed=7,
    )  # fmt: skip
    assert head.selection == direct.selection and head.selection["folds"] == 3
    assert {c["l2"] for c in head.selection["candidates"]} == {0.01, 3.0}
    np.testing.assert_array_equal(head.weights, direct.weights)
    other_seed = configured_global_head(x, y, users, 2, dataclasses.replace(config, seed=8))
    assert other_seed.selection != head.selection  # the seed reaches the user folds


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"l2_grid": (0.5,), "weighting_grid": (False,)}, "one candidate"),
        ({"l2_grid": (0.5, 1.0), "weighting_grid": (False,), "one_user": True}, "one training"),
    ],
)
def test_nothing_to_choose_fits_the_first_candidate(kwargs: dict[str, Any], reason: str) -> None:
    x, y, users = users_data()
    if kwargs.pop("one_user", False):
        users = np.full(len(users), "solo")
    head = fit_global_head(x, y, users, n_classes=2, steps=200, folds=5, seed=0, **kwargs)
    assert head.selection["reason"].startswith(reason) and head.selection["candidates"] == []
    assert (head.l2, head.class_weighting) == (0.5, False)


def test_config_takes_one_value_or_a_grid_and_refuses_bad_ones() -> None:
    one = EvalConfig(head_l2=0.1, head_class_weighting=False)  # type: ignore[arg-type]
    assert one.head_l2 == (0.1,) and one.head_class_weighting == (False,)
    assert EvalConfig(head_l2=(0.1, 0.1, 1)).head_l2 == (0.1, 1.0)
    for bad in (
        {"head_l2": ()},
        {"head_l2": (float("nan"),)},
        {"head_l2": (-1.0,)},
        {"head_l2": ("0.1",)},
        {"head_class_weighting": ()},
        {"head_class_weighting": (1,)},
        {"head_folds": 1},
    ):
        with pytest.raises(InvalidInputError, match=r"EvalConfig\.head_"):
            EvalConfig(**bad)
