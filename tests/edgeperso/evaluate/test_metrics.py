"""The metric functions against hand-computed values and brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeperso import InvalidInputError
from edgeperso.evaluate import accuracy, bootstrap_ci, macro_f1, mae
from edgeperso.evaluate._metrics import summarize, worst_decile


def brute_force_macro_f1(truth: list[str], pred: list[str]) -> float:
    """F1 = harmonic mean of precision and recall, per class, by counting pair by pair."""
    scores = []
    for c in sorted(set(truth) | set(pred)):
        pairs = list(zip(truth, pred))
        predicted = [t for t, p in pairs if p == c]
        actual = [p for t, p in pairs if t == c]
        precision = sum(t == c for t in predicted) / len(predicted) if predicted else 0.0
        recall = sum(p == c for p in actual) / len(actual) if actual else 0.0
        total = precision + recall
        scores.append(0.0 if total == 0 else 2 * precision * recall / total)
    return sum(scores) / len(scores)


def test_macro_f1_of_a_hand_computed_case() -> None:
    truth = ["yes", "yes", "no", "no"]
    pred = ["yes", "no", "no", "no"]
    # yes: P=1, R=1/2 -> F1 2/3; no: P=2/3, R=1 -> F1 4/5
    assert macro_f1(truth, pred) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert accuracy(truth, pred) == 0.75


def test_macro_f1_counts_a_class_that_is_only_predicted() -> None:
    # "yes" never occurs but is predicted once: it scores 0 and halves the mean.
    assert macro_f1(["no", "no"], ["no", "yes"]) == pytest.approx((2 / 3 + 0) / 2)
    assert macro_f1(["no", "no"], ["no", "no"]) == 1.0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), min_size=1, max_size=40))
def test_macro_f1_matches_the_brute_force_definition(pairs: list[tuple[str, str]]) -> None:
    truth, pred = [t for t, _ in pairs], [p for _, p in pairs]
    assert macro_f1(truth, pred) == pytest.approx(brute_force_macro_f1(truth, pred))


def test_mae_and_length_checks() -> None:
    assert mae([1.0, 2.0, 3.0], [1.5, 2.0, 1.0]) == pytest.approx(2.5 / 3)
    with pytest.raises(InvalidInputError):
        macro_f1(["a"], ["a", "b"])
    with pytest.raises(InvalidInputError):
        accuracy([], [])


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=50), st.integers(0, 99))
def test_bootstrap_ci_contains_the_mean(values: list[float], seed: int) -> None:
    low, high = bootstrap_ci(values, resamples=500, seed=seed)
    mean = float(np.mean(values))
    assert low - 1e-9 <= mean <= high + 1e-9
    assert min(values) - 1e-9 <= low <= high <= max(values) + 1e-9


def test_bootstrap_ci_is_seeded_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(size=10).tolist(), rng.normal(size=1000).tolist()
    assert bootstrap_ci(few, seed=3) == bootstrap_ci(few, seed=3)
    width = [np.subtract(*bootstrap_ci(v)[::-1]) for v in (few, many)]
    assert width[1] < width[0]
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_worst_decile_is_the_lowest_tenth_worst_first() -> None:
    gains = {f"u{i:02d}": float(g) for i, g in enumerate([5, -3, 0, 2, -7, 1, 4, 3, 6, 8, -1])}
    worst = worst_decile(gains)
    assert worst == [("u04", -7.0), ("u01", -3.0)]  # 11 users -> ceil(1.1) = 2
    assert worst_decile({"a": 1.0}) == [("a", 1.0)]
    assert worst_decile({}) == []


def test_summarize_orients_gains_so_that_positive_is_better() -> None:
    global_ = {"a": 0.5, "b": 0.8, "c": 0.6}
    personal = {"a": 0.7, "b": 0.7, "c": 0.6}
    s = summarize("macro_f1", global_, personal, resamples=200)
    assert s.gain_mean == pytest.approx((0.2 - 0.1 + 0) / 3)
    assert s.gain_median == pytest.approx(0.0)
    assert s.share_worse == pytest.approx(1 / 3) and s.share_better == pytest.approx(1 / 3)
    assert s.worst_decile == (("b", pytest.approx(-0.1)),)
    assert s.global_mean == pytest.approx(1.9 / 3) and s.personal_median == pytest.approx(0.7)
    errors = summarize("mae", {"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 2.5}, lower_is_better=True)
    assert errors.gain_mean == pytest.approx(0.0) and errors.worst_decile[0][0] == "b"


def test_brute_force_helper_agrees_on_every_tiny_case() -> None:
    for truth in itertools.product("ab", repeat=3):
        for pred in itertools.product("ab", repeat=3):
            assert macro_f1(list(truth), list(pred)) == pytest.approx(
                brute_force_macro_f1(list(truth), list(pred))
            )
