"""Bad input is refused with a typed error that says what was wrong, and leaves the store as
it was; unsupported requests on an embedding bundle raise UnsupportedError."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError, UnsupportedError
from edgeperso.runtime import Personalizer, SessionOptions, TrainConfig
from edgeperso.store import Example, PassphraseKey, Store
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


@pytest.mark.parametrize("texts", [[b"bytes"], [None], [42], ["fine", 3.5], b"bytes", 42])
def test_texts_that_are_not_a_sequence_of_str_are_refused(
    classifier: Personalizer, texts: Any
) -> None:
    with pytest.raises(InvalidInputError, match="str"):
        classifier.predict("alice", texts)
    with pytest.raises(InvalidInputError, match="str"):
        classifier.embed("alice", texts)


def test_one_text_gives_what_a_batch_of_one_gives(
    classifier: Personalizer, regressor: Personalizer
) -> None:
    text = "the cat sat on the mat"
    assert classifier.predict("alice", text) == classifier.predict("alice", [text])[0]
    probabilities = classifier.score("alice", text)
    assert probabilities.shape == (3,)
    np.testing.assert_array_equal(probabilities, classifier.score("alice", [text])[0])
    vector = classifier.embed("alice", text)
    np.testing.assert_array_equal(vector, classifier.embed("alice", [text])[0])
    assert vector.ndim == 1
    score = regressor.score("alice", text)
    assert score.shape == () and float(score) == regressor.score("alice", [text])[0]
    assert regressor.predict("alice", text).score == float(score)


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


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.similar("alice", PETS[0], k="3"),
        lambda m: m.similar("alice", PETS[0], k=2.5),
        lambda m: m.install_shared(["global.head.b"]),
        lambda m: m.install_shared(None),
        lambda m: m.shared_update("alice", "global.head.b"),
        lambda m: m.shared_update("alice", None),
        lambda m: m.train_shared("hello"),
        lambda m: m.train_shared(topic_examples(2), names="global.head.b"),
        lambda m: m.train("alice", TrainConfig(seed=-1)),
        lambda m: m.predict("alice", ["a lone \ud800 surrogate"]),
        lambda m: m.add_examples("al\udcffice", [Example("hello", label="a")]),
        lambda m: m.save_shared(None),
        lambda m: m.load_shared(None),
        lambda m: m.forget("alice", wait_s="1"),
    ],
    ids=[
        "similar-k-str",
        "similar-k-float",
        "install_shared-list",
        "install_shared-none",
        "shared_update-names-str",
        "shared_update-names-none",
        "train_shared-str",
        "train_shared-names-str",
        "train-seed",
        "predict-surrogate",
        "user-surrogate",
        "save_shared-none",
        "load_shared-none",
        "forget-wait-str",
    ],
)
def test_arguments_of_the_wrong_type_are_refused_with_a_typed_error(
    classifier: Personalizer, store: Store, alice: tuple[Any, ...], call: Callable[..., object]
) -> None:
    shared = classifier.shared_params()
    with pytest.raises(InvalidInputError):
        call(classifier)
    assert snapshot(store, "alice") == alice
    assert all(np.array_equal(v, classifier.shared_params()[k]) for k, v in shared.items())


def test_an_example_with_a_lone_surrogate_cannot_be_built() -> None:
    with pytest.raises(InvalidInputError, match="surrogate"):
        Example("bad \ud800 text")
    with pytest.raises(InvalidInputError, match="surrogate"):
        Example("fine", label="bad \udfff label")
    with pytest.raises(InvalidInputError, match="surrogate"):
        Example("fine", metadata={"note": "\ud834"})


@pytest.mark.parametrize(
    "make",
    [
        lambda: SessionOptions(intra_op_threads="2"),
        lambda: SessionOptions(inter_op_threads=1.5),
        lambda: SessionOptions(providers="CPUExecutionProvider"),
        lambda: PassphraseKey("a passphrase", memory_kib="65536"),
        lambda: PassphraseKey("a passphrase", iterations=True),
    ],
    ids=["intra-str", "inter-float", "providers-str", "memory-str", "iterations-bool"],
)
def test_options_of_the_wrong_type_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(InvalidInputError):
        make()


def test_opening_a_personalizer_without_a_bundle_path_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInputError, match=r"str or os\.PathLike"):
        Personalizer.open(None, store)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add_examples("alice", Example("one", label="a")), "wrap the one"),
        (lambda m: m.add_examples("alice", (e for e in topic_examples(1))), "list of Example"),
        (lambda m: m.add_examples("alice", np.array(topic_examples(1))), "list of Example"),
        (lambda m: m.add_feedback("alice", "correction"), "list of Feedback"),
        (lambda m: m.train("alice", on_progress=5), "on_progress"),
        (lambda m: m.train("alice", cancel="stop"), "cancel"),
        (lambda m: m.save_shared("shared\0.safetensors"), "NUL"),
        (lambda m: m.install_shared({1: np.zeros(3), "global.head.b": np.zeros(3)}), "name"),
        (lambda m: m.shared_update("alice", ["global.head.b", 3]), "names"),
    ],
    ids=[
        "one-example",
        "generator",
        "array",
        "feedback-str",
        "progress",
        "cancel",
        "nul-path",
        "mixed-keys",
        "mixed-names",
    ],
)
def test_arguments_of_the_wrong_kind_are_refused_before_any_work(
    classifier: Personalizer,
    store: Store,
    alice: tuple[Any, ...],
    call: Callable[[Personalizer], object],
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        call(classifier)
    assert snapshot(store, "alice") == alice


def test_bad_session_options_are_refused_before_onnxruntime_sees_them(
    tiny_bundles: dict[str, Any], store: Store
) -> None:
    with pytest.raises(InvalidInputError, match=r"1\.\.1024"):
        SessionOptions(intra_op_threads=2**40)
    with pytest.raises(InvalidInputError, match="SessionOptions"):
        Personalizer.open(tiny_bundles["classification"], store, session={"threads": 2})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="NUL"):
        Personalizer.open("bundle\0dir", store)
