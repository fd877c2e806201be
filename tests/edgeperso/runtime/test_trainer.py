"""The numpy half of training: AdamW, clipping, the schedule, metrics, the held-out split,
and TrainConfig validation. Reference implementations are torch and scikit-learn."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from edgeperso import InvalidInputError
from edgeperso.runtime import TrainConfig
from edgeperso.runtime._params import from_bytes, to_bytes
from edgeperso.runtime._trainer import (
    AdamW,
    clear_advantage,
    clip_by_global_norm,
    learning_rate,
    macro_f1,
    split_holdout,
    stratified_folds,
)

SHAPES = {"user.bias": (3,), "user.vector": (32,), "user.lora.l1.query.B": (8, 32)}


def random_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def random_grads(rng: np.random.Generator, steps: int) -> list[dict[str, np.ndarray]]:
    return [random_params(rng) for _ in range(steps)]


def test_adamw_matches_torch_adamw_step_for_step() -> None:
    rng = np.random.default_rng(1)
    params = random_params(rng)
    grads = random_grads(rng, 6)
    lrs = [0.01, 0.02, 0.05, 0.05, 0.03, 0.001]  # as a schedule feeds them
    reference = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(reference.values(), lr=lrs[0], weight_decay=0.1)
    ours = AdamW(weight_decay=0.1)

    for g, lr in zip(grads, lrs):
        ours.step(params, {k: v.copy() for k, v in g.items()}, lr)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        for name, p in reference.items():
            p.grad = torch.tensor(g[name])
        torch_opt.step()
        for name, p in reference.items():
            np.testing.assert_allclose(params[name], p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_adamw_resumed_from_its_saved_state_continues_exactly() -> None:
    rng = np.random.default_rng(2)
    grads = random_grads(rng, 6)
    start = random_params(rng)

    straight, opt = {k: v.copy() for k, v in start.items()}, AdamW(0.01)
    for g in grads:
        opt.step(straight, g, 0.02)

    resumed, first = {k: v.copy() for k, v in start.items()}, AdamW(0.01)
    for g in grads[:3]:
        first.step(resumed, g, 0.02)
    second = AdamW(0.01)
    second.load(from_bytes(to_bytes(first.state())))  # the checkpoint's round trip
    for g in grads[3:]:
        second.step(resumed, g, 0.02)

    for name in start:
        np.testing.assert_array_equal(resumed[name], straight[name])


def test_global_norm_clipping_matches_torch_and_leaves_small_gradients_alone() -> None:
    rng = np.random.default_rng(3)
    grads = {k: 10 * v for k, v in random_params(rng).items()}
    reference = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(reference, grads.values()):
        t.grad = torch.tensor(g.copy())
    expected_norm = float(torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0))

    norm = clip_by_global_norm(grads, 1.0)

    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for t, g in zip(reference, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5, atol=1e-8)
    clipped = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert clipped == pytest.approx(1.0, rel=1e-5)

    small = {k: v / (10 * norm) for k, v in grads.items()}
    before = {k: v.copy() for k, v in small.items()}
    clip_by_global_norm(small, 1.0)
    for name in small:
        np.testing.assert_array_equal(small[name], before[name])


def test_learning_rate_warms_up_linearly_then_decays_as_a_half_cosine() -> None:
    config = TrainConfig(learning_rate=0.1, warmup_fraction=0.25)
    total = 20  # warm-up: steps 0..4
    lrs = [learning_rate(config, s, total) for s in range(total)]

    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == pytest.approx(0.1)  # the decay starts at the peak
    # Half-way through the decay the cosine is at half the peak.
    assert learning_rate(config, 5 + 15 // 2, total) == pytest.approx(
        0.05 * (1 + math.cos(math.pi * 7 / 15))
    )
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 14 / 15)))
    assert lrs[-1] < 0.01


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 400),
    warmup=st.floats(0, 0.95),
    peak=st.floats(1e-4, 1.0),
)
def test_learning_rate_rises_to_the_peak_then_never_rises_again(
    total: int, warmup: float, peak: float
) -> None:
    config = TrainConfig(learning_rate=peak, warmup_fraction=warmup)
    lrs = np.array([learning_rate(config, s, total) for s in range(total)])
    top = int(np.argmax(lrs))

    assert lrs.max() == pytest.approx(peak)
    assert np.all(lrs > 0)
    assert np.all(np.diff(lrs[: top + 1]) > 0)
    assert np.all(np.diff(lrs[top:]) <= 1e-12)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40))
def test_macro_f1_equals_scikit_learn_macro_f1(pairs: list[tuple[int, int]]) -> None:
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    expected = f1_score(y_true, y_pred, average="macro", zero_division=0.0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_holdout_split_is_disjoint_complete_and_stratified(
    labels: list[int], fraction: float, seed: int
) -> None:
    train, held = split_holdout(labels, len(labels), fraction, np.random.default_rng(seed))

    assert set(train).isdisjoint(held)
    assert sorted([*train, *held]) == list(range(len(labels)))
    counts = Counter(labels)
    held_counts = Counter(labels[i] for i in held)
    train_counts = Counter(labels[i] for i in train)
    for cls, n in counts.items():
        if n == 1:  # a single example is only ever trained on
            assert held_counts[cls] == 0
            continue
        # Every class with two examples or more is represented on both sides, about
        # `fraction` of it held out.
        assert held_counts[cls] >= 1
        assert train_counts[cls] >= 1
        assert held_counts[cls] == min(n - 1, max(1, round(fraction * n)))


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 60), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32 - 1))
def test_holdout_split_without_labels_keeps_both_sides_non_empty(
    n: int, fraction: float, seed: int
) -> None:
    train, held = split_holdout(None, n, fraction, np.random.default_rng(seed))

    assert set(train).isdisjoint(held)
    assert sorted([*train, *held]) == list(range(n))
    assert len(held) >= 1
    assert len(train) >= 1


@settings(max_examples=100, deadline=None)
@given(
    labels=st.lists(st.integers(0, 2), min_size=2, max_size=60),
    k=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_folds_are_balanced_per_class_and_overall(labels: list[int], k: int, seed: int) -> None:
    folds = stratified_folds(labels, len(labels), k, np.random.default_rng(seed))

    used = min(k, len(labels))
    assert set(folds) <= set(range(used))
    sizes = np.bincount(folds, minlength=used)
    assert sizes.max() - sizes.min() <= 1
    for cls in set(labels):
        per_fold = np.bincount(folds[np.array(labels) == cls], minlength=used)
        assert per_fold.max() - per_fold.min() <= 1


def test_holdout_split_depends_only_on_the_seed() -> None:
    labels = [0, 1, 2] * 10
    first = split_holdout(labels, 30, 0.2, np.random.default_rng(7))
    second = split_holdout(labels, 30, 0.2, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_a_candidate_is_clear_only_above_the_threshold_in_standard_errors() -> None:
    # mean 0.08, standard error 0.0735 (sample std 0.1643 over 5 folds): 1.09 SEs
    noisy = np.array([0.2, -0.1, 0.2, -0.1, 0.2])
    assert clear_advantage(noisy, 1.0)
    assert not clear_advantage(noisy, 1.5)
    assert clear_advantage(np.full(5, 0.01), 3.0)  # no spread: any positive mean is clear
    assert not clear_advantage(np.zeros(5), 0.0)  # no gain is never clear
    assert not clear_advantage(np.array([-0.2, 0.1, -0.2, 0.1, -0.2]), 0.0)


@pytest.mark.parametrize(
    "field",
    [
        {"epochs": 0},
        {"folds": 1},
        {"selection_se": -1.0},
        {"head_l2": ()},
        {"head_l2": (0.0,)},
        {"head_l2": "0.1"},
        {"head_l2": (float("nan"),)},
        {"knn_k": (0,)},
        {"knn_k": (2.5,)},
        {"knn_k": 5},
        {"knn_weight": (0.0,)},
        {"knn_weight": (1.5,)},
        {"knn_weight": (True,)},
        {"adapter": 1},
        {"epochs": -1},
        {"epochs": 2.5},
        {"epochs": "3"},
        {"epochs": True},
        {"learning_rate": 0.0},
        {"learning_rate": -1e-3},
        {"learning_rate": math.nan},
        {"learning_rate": math.inf},
        {"weight_decay": -0.1},
        {"weight_decay": math.nan},
        {"prox_weight": -1.0},
        {"prox_weight": math.nan},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": math.nan},
        {"warmup_fraction": 1.0},
        {"warmup_fraction": -0.1},
        {"holdout_fraction": 0.0},
        {"holdout_fraction": 1.0},
        {"max_seconds": 0.0},
        {"max_seconds": math.nan},
        {"max_steps": 0},
        {"max_steps": 1.5},
        {"max_examples": 0},
        {"seed": "0"},
    ],
    ids=lambda f: ",".join(f"{k}={v!r}" for k, v in f.items()),
)
def test_invalid_train_config_is_refused_with_invalid_input_error(field: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(field))):
        TrainConfig(**field)


def test_default_train_config_and_explicit_limits_are_accepted() -> None:
    TrainConfig()
    TrainConfig(epochs=1, max_seconds=None, max_steps=None, max_examples=None, weight_decay=0.0)
    TrainConfig(max_grad_norm=math.inf)  # no clipping
