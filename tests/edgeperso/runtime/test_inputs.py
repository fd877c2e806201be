"""Bad input is refused with a typed error that says what was wrong, and leaves the store as
it was; unsupported requests on an embedding bundle raise UnsupportedError."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError, UnsupportedError
from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.store import Example, Store
from tests.edgeperso.runtime.conftest import PETS, topic_examples


def snapshot(store: Store, user: str) -> tuple[Any, ...]:
    embeddings = store.embeddings(user)
    return (
        store.examples(user),
        store.blobs(user),
        sorted(embeddings),
        [embeddings[i].tobytes() for i in sorted(embeddings)],
    )


@pytest.fixture
def alice(classifier: Personalizer, store: Store) -> tuple[Any, ...]:
    """Alice with a few stored examples; returns the store's state for her."""
    classifier.add_examples("alice", topic_examples(3))
    return snapshot(store, "alice")


@pytest.mark.parametrize("text", ["", " ", "\t\n  "])
def test_empty_or_whitespace_text_is_refused_everywhere(
    classifier: Personalizer, store: Store, alice: tuple[Any, ...], text: str
) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        classifier.add_examples("alice", [Example("fine", label="a"), Example(text, label="a")])
    with pytest.raises(InvalidInputError, match="empty"):
        classifier.predict("alice", ["fine", text])
    with pytest.raises(InvalidInputError, match="empty"):
        classifier.similar("alice", text)
    assert snapshot(store, "alice") == alice


@pytest.mark.parametrize("texts", [[b"bytes"], [None], [42], ["fine", 3.5], "a bare string"])
def test_texts_that_are_not_a_sequence_of_str_are_refused(
    classifier: Personalizer, texts: Any
) -> None:
    with pytest.raises(InvalidInputError, match="str"):
        classifier.predict("alice", texts)
    with pytest.raises(InvalidInputError, match="str"):
        classifier.embed("alice", texts)


def test_an_example_whose_text_is_not_str_cannot_even_be_built() -> None:
    with pytest.raises(InvalidInputError, match="text"):
        Example(b"bytes", label="a")  # type: ignore[arg-type]


def test_add_examples_refuses_what_is_not_an_example(
    classifier: Personalizer, store: Store, alice: tuple[Any, ...]
) -> None:
    with pytest.raises(InvalidInputError, match="Example"):
        classifier.add_examples("alice", [Example("ok", label="a"), ("text", "a")])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="empty"):
        classifier.add_examples("alice", [])
    assert snapshot(store, "alice") == alice


@pytest.mark.parametrize("label", ["d", "A", 1, 0.5])
def test_a_label_the_bundle_does_not_have_is_refused_and_nothing_is_stored(
    classifier: Personalizer, store: Store, alice: tuple[Any, ...], label: Any
) -> None:
    batch = [Example("first is fine", label="a"), Example("second is not", label=label)]
    with pytest.raises(InvalidInputError, match=r"examples\[1\]\.label"):
        classifier.add_examples("alice", batch)
    assert snapshot(store, "alice") == alice


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf, True, False])
def test_a_non_finite_or_boolean_score_is_refused_for_regression(
    regressor: Personalizer, store: Store, score: Any
) -> None:
    regressor.add_examples("alice", [Example("kept", label=1.5)])
    before = snapshot(store, "alice")
    with pytest.raises(InvalidInputError, match="label"):
        regressor.add_examples("alice", [Example("fine", label=0.5), Example("bad", label=score)])
    assert snapshot(store, "alice") == before


def test_a_class_label_is_refused_for_regression(regressor: Personalizer, store: Store) -> None:
    with pytest.raises(InvalidInputError, match="number"):
        regressor.add_examples("alice", [Example("bad", label="a")])
    assert store.examples("alice") == []


@pytest.mark.parametrize("config", ["fast", {"epochs": 1}, TrainConfig])
def test_train_refuses_a_config_that_is_not_a_train_config(
    classifier: Personalizer, store: Store, alice: tuple[Any, ...], config: Any
) -> None:
    with pytest.raises(InvalidInputError, match="TrainConfig"):
        classifier.train("alice", config)
    assert snapshot(store, "alice") == alice


def test_similar_refuses_k_below_one(classifier: Personalizer, alice: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidInputError, match="k"):
        classifier.similar("alice", PETS[0], k=0)


def test_predict_and_score_on_an_embedding_bundle_raise_unsupported(
    embedder: Personalizer,
) -> None:
    with pytest.raises(UnsupportedError, match="embed"):
        embedder.predict("alice", ["hello"])
    with pytest.raises(UnsupportedError, match="embed"):
        embedder.score("alice", ["hello"])
    vectors = embedder.embed("alice", ["hello", "world"])
    assert vectors.shape == (2, embedder.manifest.output_size)
    assert np.isfinite(vectors).all()


def test_train_on_an_embedding_bundle_without_groups_is_refused_and_stores_nothing(
    embedder: Personalizer, store: Store
) -> None:
    embedder.add_examples("alice", [Example(t) for t in PETS])  # history only, no groups
    before = snapshot(store, "alice")
    with pytest.raises(InvalidInputError, match="labelled examples"):
        embedder.train("alice", TrainConfig(epochs=1))
    assert snapshot(store, "alice") == before


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.predict("", ["hello"]),
        lambda m: m.add_examples(7, [Example("hello", label="a")]),
        lambda m: m.train(None),
    ],
    ids=["predict", "add_examples", "train"],
)
def test_an_invalid_user_id_is_refused(
    classifier: Personalizer, call: Callable[[Personalizer], object]
) -> None:
    with pytest.raises(InvalidInputError):
        call(classifier)
