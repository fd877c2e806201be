"""Levels and users: a fresh user gets exactly the shared model; a user's adapter changes
that user's predictions and nobody else's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from edgeperso import Bundle
from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.store import RawKey, Store
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples

TEXTS = [*PETS, *MARKETS, "something else entirely"]
LEARNABLE = TrainConfig(
    adapter=True, epochs=20, learning_rate=0.2
)  # reliably beats the shared model


def shared_model_outputs(bundle_dir: Path, texts: list[str]) -> np.ndarray:
    """The bundle's graph as exported, with none of its overridable inputs fed."""
    bundle = Bundle.load(bundle_dir)
    tokenizer = Tokenizer.from_file(str(bundle.path_of(bundle.manifest.tokenizer)))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(bundle.path_of("infer.onnx")), options)
    output: np.ndarray = session.run(["output"], feeds)[0]
    return output


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_fresh_user_predicts_exactly_like_the_shared_model(
    tiny_bundles: dict[str, Path], store: Store, task: str
) -> None:
    model = Personalizer.open(tiny_bundles[task], store)
    expected = shared_model_outputs(tiny_bundles[task], TEXTS)

    predictions = model.predict("newcomer", TEXTS)

    assert not any(p.personalized for p in predictions)
    if task == "regression":
        np.testing.assert_array_equal([p.score for p in predictions], expected[:, 0])
        return
    labels = [model.manifest.labels[i] for i in expected.argmax(-1)]
    assert [p.label for p in predictions] == labels
    e = np.exp(expected - expected.max(-1, keepdims=True))
    probabilities = np.array([list(p.probabilities.values()) for p in predictions])  # type: ignore[union-attr]
    np.testing.assert_allclose(probabilities, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=0)


def test_a_personal_adapter_changes_its_users_predictions_and_nobody_elses(
    classifier: Personalizer,
) -> None:
    # Both users have a history; neither has an adapter yet.
    classifier.add_examples("alice", topic_examples(12, pets="a", markets="b"))
    classifier.add_examples("bob", topic_examples(12, pets="b", markets="a"))
    bob_before = classifier.score("bob", TEXTS)
    stranger_before = classifier.score("stranger", TEXTS)

    result = classifier.train("alice", LEARNABLE)

    assert result.kept == "personal"
    assert all(p.personalized for p in classifier.predict("alice", TEXTS))
    assert not np.allclose(classifier.score("alice", TEXTS), bob_before, atol=1e-3)
    assert not any(p.personalized for p in classifier.predict("bob", TEXTS))
    np.testing.assert_array_equal(classifier.score("bob", TEXTS), bob_before)
    np.testing.assert_array_equal(classifier.score("stranger", TEXTS), stranger_before)

    # Bob's own adapter, trained on the opposite labelling, leaves Alice's as it was.
    alice_after = classifier.score("alice", TEXTS)
    assert classifier.train("bob", LEARNABLE).kept == "personal"
    np.testing.assert_array_equal(classifier.score("alice", TEXTS), alice_after)
    alice_labels = [p.label for p in classifier.predict("alice", [PETS[0], MARKETS[0]])]
    bob_labels = [p.label for p in classifier.predict("bob", [PETS[0], MARKETS[0]])]
    assert alice_labels != bob_labels


def test_forgetting_a_user_returns_them_to_the_shared_model(
    classifier: Personalizer, store: Store
) -> None:
    shared = classifier.score("alice", TEXTS)
    classifier.add_examples("alice", topic_examples(12))
    assert classifier.train("alice", LEARNABLE).kept == "personal"

    assert classifier.forget("alice")

    assert "alice" not in store.users()
    assert not any(p.personalized for p in classifier.predict("alice", TEXTS))
    np.testing.assert_array_equal(classifier.score("alice", TEXTS), shared)


# The head stage alone, with retrieval off: quick, and it wins on swapped labels.
HEAD = TrainConfig(knn_k=())


def test_a_user_trained_in_another_process_is_served_the_new_adapter(
    tiny_bundles: dict[str, Path], store: Store, key: RawKey
) -> None:
    # The app serves alice (her state is now decrypted in its memory) while a second handle
    # on the same file, as a background trainer process would hold, trains her.
    app = Personalizer.open(tiny_bundles["classification"], store)
    app.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    assert not app.predict("alice", [PETS[0]])[0].personalized
    with Store.open(store.path, key) as other:
        trainer = Personalizer.open(tiny_bundles["classification"], other)
        assert trainer.train("alice", HEAD).kept == "personal"
        expected = trainer.score("alice", TEXTS)

    assert app.predict("alice", [PETS[0]])[0].personalized
    np.testing.assert_allclose(app.score("alice", TEXTS), expected, atol=1e-6)


def test_forget_drops_the_users_decrypted_state(classifier: Personalizer) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    assert classifier.train("alice", HEAD).kept == "personal"
    assert classifier.predict("alice", [PETS[0]])[0].personalized

    classifier.forget("alice")

    assert "alice" not in classifier._served  # her adapter is no longer in memory either
    assert not classifier.predict("alice", [PETS[0]])[0].personalized
