"""install_shared(): persona/global parameters from federation are validated, applied to
every user's predictions, and persisted in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError
from edgeperso.runtime import Personalizer
from edgeperso.store import RawKey, Store
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples

TEXTS = ["the cat sat on the mat", "stock prices fell"]


@pytest.mark.parametrize(
    "params",
    [
        {"user.bias": np.zeros(3, np.float32)},  # user level never comes from federation
        {"global.head.nope": np.zeros(3, np.float32)},
        {"global.head.b": np.zeros(4, np.float32)},
        {"global.head.b": np.zeros((1, 3), np.float32)},
        {"global.head.b": np.zeros(3, np.float64)},
        {"global.head.b": np.array([0, np.nan, 0], np.float32)},
        {"global.head.b": np.array([0, 0, np.inf], np.float32)},
        {"global.head.b": [0.0, 0.0, 0.0]},
        {
            "persona.bias": np.ones(3, np.float32),
            "global.head.b": np.array([np.nan] * 3, np.float32),
        },
    ],
    ids=[
        "user-level",
        "unknown",
        "wrong-length",
        "wrong-rank",
        "float64",
        "nan",
        "inf",
        "not-an-array",
        "one-bad-of-two",
    ],
)
def test_install_shared_refuses_bad_parameters_and_changes_nothing(
    classifier: Personalizer, store: Store, params: dict[str, Any]
) -> None:
    before = classifier.shared_params()
    served = classifier.score("alice", TEXTS)

    with pytest.raises(InvalidInputError):
        classifier.install_shared(params)

    after = classifier.shared_params()
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(classifier.score("alice", TEXTS), served)
    assert store.users() == []


def test_installed_shared_parameters_serve_every_user_and_survive_reopening(
    tiny_bundles: dict[str, Path], tmp_path: Path, key: RawKey
) -> None:
    bundle = tiny_bundles["classification"]
    head_b = np.array([4.0, -4.0, 0.0], np.float32)
    persona = np.array([0.0, 0.0, 1.0], np.float32)
    with Store.open(tmp_path / "profile.db", key) as store:
        model = Personalizer.open(bundle, store)
        untouched = {k: v for k, v in model.shared_params().items() if "bias" not in k}
        model.install_shared({"global.head.b": head_b, "persona.bias": persona})
        shifted = model.score("alice", TEXTS)
        assert [p.label for p in model.predict("bob", TEXTS)] == ["a", "a"]
        for name, value in untouched.items():
            if name != "global.head.b":
                np.testing.assert_array_equal(model.shared_params()[name], value)

    with Store.open(tmp_path / "profile.db", key) as store:
        reopened = Personalizer.open(bundle, store)
        np.testing.assert_array_equal(reopened.shared_params()["global.head.b"], head_b)
        np.testing.assert_array_equal(reopened.shared_params()["persona.bias"], persona)
        np.testing.assert_array_equal(reopened.score("alice", TEXTS), shifted)


def test_shared_params_returns_copies(classifier: Personalizer) -> None:
    copy = classifier.shared_params()
    copy["global.head.b"][:] = 100.0
    assert not np.any(classifier.shared_params()["global.head.b"] == 100.0)


def test_a_shared_update_holds_only_shared_parameters_and_moves_the_head_toward_the_user(
    classifier: Personalizer,
) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    names = ["global.head.w", "global.head.b", "persona.bias"]
    trained_before = classifier.store.blobs("alice")

    update = classifier.shared_update("alice", names, l2=0.01)

    assert set(update.before) == set(update.after) == set(names)  # no user parameter
    assert update.num_examples == 24
    assert update.summary.shape == (classifier.manifest.hidden_size,)
    assert np.linalg.norm(update.summary) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(update.before["global.head.b"], update.after["global.head.b"])
    assert np.abs(update.after["global.head.w"] - update.before["global.head.w"]).max() > 0
    assert classifier.store.blobs("alice") == trained_before  # nothing stored, nothing trained
    # Installed as the shared model, the update sorts the user's topics her way for everyone.
    classifier.install_shared(update.after)
    bob = classifier.predict("bob", [PETS[0], MARKETS[0]])
    assert [p.label for p in bob] == ["b", "a"]


def test_a_shared_update_refuses_user_parameters(classifier: Personalizer) -> None:
    classifier.add_examples("alice", topic_examples(4))
    with pytest.raises(InvalidInputError, match="not persona/global"):
        classifier.shared_update("alice", ["user.bias"])
