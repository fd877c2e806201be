"""export_adapter / import_adapter move a trained user to another device, sealed; feedback
corrections relabel examples for the next train()."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeperso import (
    Feedback,
    InvalidInputError,
    PassphraseKey,
    RawKey,
    TamperedError,
    UnsupportedError,
    WrongKeyError,
)
from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.store import Example, Store
from tests.edgeperso.runtime.conftest import topic_examples

# Cheap KDF settings: these tests are about the package, not the passphrase's cost.
CHEAP = {"memory_kib": 1024, "iterations": 1, "lanes": 1}
PROBES = ["the cat sat on the mat", "stock prices fell sharply today", "a puppy and a bond"]


@pytest.fixture
def trained(classifier: Personalizer) -> Personalizer:
    # Swapped labels, so the user's adapter must differ from the shared model to win.
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    result = classifier.train("alice", TrainConfig(adapter=True, epochs=10))
    assert result.kept == "personal", result.reason
    return classifier


def test_an_exported_adapter_predicts_the_same_on_another_device(
    trained: Personalizer, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    key = PassphraseKey("correct horse battery staple", **CHEAP)
    package = trained.export_adapter("alice", key)

    with Store.open(tmp_path / "other.db", RawKey(os.urandom(32))) as other_store:
        other = Personalizer.open(tiny_bundles["classification"], other_store)
        assert not other.predict("alice", PROBES)[0].personalized
        other.import_adapter("alice", package, PassphraseKey("correct horse battery staple"))

        before = trained.score("alice", PROBES)
        after = other.score("alice", PROBES)
        assert other.predict("alice", PROBES)[0].personalized
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
        assert other_store.examples("alice") == []  # the adapter moves, the texts do not


def test_an_adapter_package_is_sealed(trained: Personalizer, tmp_path: Path) -> None:
    package = trained.export_adapter("alice", RawKey(b"k" * 32))
    text = PROBES[0].encode()
    assert text not in package
    assert b"alice" not in package
    with pytest.raises(WrongKeyError):
        trained.import_adapter("bob", package, RawKey(b"x" * 32))
    tampered = bytearray(package)
    tampered[-20] ^= 1
    with pytest.raises(TamperedError):
        trained.import_adapter("bob", bytes(tampered), RawKey(b"k" * 32))
    with pytest.raises(TamperedError):
        trained.import_adapter("bob", package[:-1], RawKey(b"k" * 32))
    assert not trained.predict("bob", PROBES)[0].personalized  # nothing was installed


def test_an_adapter_for_another_bundle_is_refused(
    trained: Personalizer, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    package = trained.export_adapter("alice", RawKey(b"k" * 32))
    with Store.open(tmp_path / "other.db", RawKey(os.urandom(32))) as other_store:
        regressor = Personalizer.open(tiny_bundles["regression"], other_store)
        with pytest.raises(UnsupportedError, match="another bundle"):
            regressor.import_adapter("alice", package, RawKey(b"k" * 32))
        assert "alice" not in other_store.users()


def test_exporting_a_user_without_an_adapter_says_so(classifier: Personalizer) -> None:
    with pytest.raises(InvalidInputError, match="no accepted adapter"):
        classifier.export_adapter("nobody", RawKey(b"k" * 32))


def test_a_correction_relabels_its_example_for_the_next_training(
    classifier: Personalizer, store: Store
) -> None:
    ids = classifier.add_examples("alice", [Example("the cat sat on the mat", label="a")])
    classifier.add_feedback("alice", [Feedback("correction", value="c", example_id=ids[0])])
    classifier.add_feedback("alice", [Feedback("thumbs-up", example_id=ids[0])])

    (example,) = classifier._training_examples("alice", TrainConfig())

    assert example.label == "c"
    assert store.examples("alice")[0].label == "a"  # the stored example itself is unchanged


def test_a_correction_must_name_an_example_and_a_known_label(classifier: Personalizer) -> None:
    with pytest.raises(InvalidInputError, match="example_id"):
        classifier.add_feedback("alice", [Feedback("correction", value="a")])
    with pytest.raises(InvalidInputError, match="labels"):
        classifier.add_feedback("alice", [Feedback("correction", value="zzz", example_id=1)])
    assert "alice" not in classifier.store.users()


def test_a_retrieval_adapter_moves_with_its_memory(
    classifier: Personalizer, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    config = TrainConfig(head_l2=(1e9,), knn_k=(1,), knn_weight=(0.9,))
    assert classifier.train("alice", config).stage == "knn"
    package = classifier.export_adapter("alice", RawKey(b"k" * 32))

    with Store.open(tmp_path / "other.db", RawKey(os.urandom(32))) as other_store:
        other = Personalizer.open(tiny_bundles["classification"], other_store)
        other.import_adapter("alice", package, RawKey(b"k" * 32))
        np.testing.assert_allclose(
            other.score("alice", PROBES), classifier.score("alice", PROBES), rtol=0, atol=1e-6
        )
