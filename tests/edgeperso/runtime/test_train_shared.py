"""train_shared(): the global LoRA and head trained on pooled examples through the train
graph, returned (never installed by the call itself), with typed errors on bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeperso import Example, InvalidInputError, UnsupportedError
from edgeperso.runtime import Personalizer, SharedTrainConfig
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples

# Pets are "a", markets "b": the tiny random model's global level does not know that.
POOLED = topic_examples(24)
PROBES = [f"{t} {i}" for i in range(30, 36) for t in (PETS[i % 6], MARKETS[i % 6])]
PROBE_LABELS = ["a", "b"] * 6


def accuracy(model: Personalizer, texts: list[str], labels: list[str]) -> float:
    predicted = [p.label for p in model.predict("nobody", texts)]
    return float(np.mean([p == t for p, t in zip(predicted, labels, strict=True)]))


def test_training_the_global_level_lowers_the_loss_and_teaches_the_shared_model(
    classifier: Personalizer,
) -> None:
    before = classifier.shared_params()
    accuracy_before = accuracy(classifier, PROBES, PROBE_LABELS)

    result = classifier.train_shared(
        POOLED, config=SharedTrainConfig(epochs=20, learning_rate=3e-2)
    )

    # the call returns parameters and installs nothing
    for name, value in classifier.shared_params().items():
        np.testing.assert_array_equal(value, before[name])
    assert set(result.params) == {
        *(s.name for s in classifier.manifest.params_at("global") if s.role == "lora_b"),
        "global.head.w",
        "global.head.b",
    }
    assert result.steps == 20 * int(np.ceil(len(POOLED) / 8)) and result.stopped == "completed"
    assert result.loss_end < 0.5 * result.loss_start
    assert result.texts == len({ex.text for ex in POOLED})
    moved = [n for n in result.params if not np.array_equal(result.params[n], before[n])]
    assert any(n.startswith("global.lora.") for n in moved)  # not only the head learned
    # the head's rows that read the user embedding are left alone: no user took part
    d = classifier.manifest.hidden_size
    np.testing.assert_array_equal(result.params["global.head.w"][d:], before["global.head.w"][d:])

    classifier.install_shared(result.params)
    # texts it never saw: the shared model now tells the topics apart
    assert accuracy(classifier, PROBES, PROBE_LABELS) >= 0.9 > accuracy_before


def test_only_the_named_parameters_are_trained(classifier: Personalizer) -> None:
    result = classifier.train_shared(
        POOLED, ["global.head.b"], SharedTrainConfig(epochs=1, learning_rate=1e-2)
    )
    assert set(result.params) == {"global.head.b"}
    assert not np.array_equal(
        result.params["global.head.b"], classifier.shared_params()["global.head.b"]
    )


def test_a_regression_bundle_trains_its_global_level(regressor: Personalizer) -> None:
    pooled = [Example(ex.text, label=2.0 if ex.label == "a" else -1.0) for ex in topic_examples(16)]
    result = regressor.train_shared(pooled, config=SharedTrainConfig(epochs=20, learning_rate=3e-2))
    assert result.loss_end < 0.5 * result.loss_start


def test_the_time_budget_and_cancel_stop_training(classifier: Personalizer) -> None:
    cancelled = classifier.train_shared(POOLED, cancel=lambda: True)
    assert cancelled.steps == 0 and cancelled.stopped == "cancelled"
    assert set(cancelled.params) >= {"global.head.w"}  # the starting values, unchanged
    calls = iter(range(1000))
    stopped = classifier.train_shared(POOLED, cancel=lambda: next(calls) >= 3)
    assert stopped.steps == 3 and stopped.stopped == "cancelled"


@pytest.mark.parametrize(
    ("names", "examples"),
    [
        (["user.bias"], POOLED),  # a user's parameters are never trained on pooled data
        (["global.head.nope"], POOLED),
        ([], POOLED),
        (None, []),
        (None, [Example("the cat", label="z")]),
        (None, [Example("   ", label="a")]),
        (None, [Example("the cat", label="a"), Example("the dog")]),
    ],
    ids=[
        "user-level",
        "unknown",
        "none",
        "no-examples",
        "unknown-label",
        "blank-text",
        "unlabelled",
    ],
)
def test_bad_input_is_refused(
    classifier: Personalizer, names: list[str] | None, examples: list[Example]
) -> None:
    with pytest.raises(InvalidInputError):
        classifier.train_shared(examples, names)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"learning_rate": float("nan")},
        {"weight_decay": -1.0},
        {"warmup_fraction": 1.0},
        {"class_weighting": 1},
        {"max_seconds": 0},
        {"seed": -1},
    ],
)
def test_a_bad_config_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        SharedTrainConfig(**kwargs)


def test_an_embedding_bundle_is_refused(embedder: Personalizer) -> None:
    with pytest.raises(UnsupportedError):
        embedder.train_shared([Example("the cat", label="pets")])
