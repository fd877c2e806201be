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
