"""save_shared() / load_shared(): the persona/global level as a safetensors file tied to its
bundle, installed on another device's personalizer exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from edgeperso import InvalidInputError
from edgeperso.runtime import Personalizer
from edgeperso.store import RawKey, Store
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples

TEXTS = [PETS[0], MARKETS[0], "a text of neither topic"]


def _retrained(model: Personalizer) -> None:
    """Shared parameters other than the bundle's own: every persona/global one moved."""
    rng = np.random.default_rng(7)
    model.install_shared(
        {
            name: (value + rng.normal(0, 0.05, value.shape)).astype(np.float32)
            for name, value in model.shared_params().items()
        }
    )


def test_a_saved_shared_level_serves_the_same_predictions_on_another_device(
    classifier: Personalizer, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    _retrained(classifier)
    served = classifier.score("alice", TEXTS)
    path = tmp_path / "global.safetensors"

    sha = classifier.save_shared(path, {"trained_on": "seed set 7"})

    assert len(sha) == 64 and path.is_file()
    assert not list(tmp_path.glob(".global.safetensors.*"))  # no temporary file left
    with Store.open(tmp_path / "other.db", RawKey(b"\x02" * 32)) as store:
        other = Personalizer.open(tiny_bundles["classification"], store)
        assert not np.allclose(other.score("bob", TEXTS), served)
        metadata = other.load_shared(path)
        assert metadata["trained_on"] == "seed set 7"
        np.testing.assert_array_equal(other.score("bob", TEXTS), served)
        for name, value in classifier.shared_params().items():
            np.testing.assert_array_equal(other.shared_params()[name], value)


def _wrong_bundle(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    with Store.open(tmp / "r.db", RawKey(b"\x03" * 32)) as store:
        Personalizer.open(tiny_bundles["regression"], store).save_shared(tmp / "f")
    return tmp / "f"


def _not_safetensors(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    (tmp / "f").write_bytes(b"PK\x03\x04 an npz, say")
    return tmp / "f"


def _truncated(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    model.save_shared(tmp / "f")
    data = (tmp / "f").read_bytes()
    (tmp / "f").write_bytes(data[: len(data) // 2])
    return tmp / "f"


def _no_format(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    safetensors.numpy.save_file(model.shared_params(), tmp / "f")
    return tmp / "f"


def _user_level_inside(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    model.save_shared(tmp / "good")
    with safetensors.safe_open(str(tmp / "good"), framework="numpy") as f:
        header = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["user.bias"] = np.ones(3, np.float32)
    safetensors.numpy.save_file(tensors, tmp / "f", metadata=header)
    return tmp / "f"


def _missing(tmp: Path, tiny_bundles: dict[str, Path], model: Personalizer) -> Path:
    return tmp / "nothing-here.safetensors"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_wrong_bundle, "another bundle"),
        (_not_safetensors, "not a safetensors file"),
        (_truncated, "not a safetensors file"),
        (_no_format, "not a shared-parameters file"),
        (_user_level_inside, "not persona/global"),
        (_missing, "no such file"),
    ],
    ids=["wrong-bundle", "not-safetensors", "truncated", "no-format", "user-level", "missing"],
)
def test_load_shared_refuses_a_bad_file_and_installs_nothing(
    classifier: Personalizer,
    tiny_bundles: dict[str, Path],
    tmp_path: Path,
    make: Callable[[Path, dict[str, Path], Personalizer], Path],
    message: str,
) -> None:
    _retrained(classifier)
    path = make(tmp_path, tiny_bundles, classifier)
    classifier.install_shared(
        {"global.head.b": np.array([1.0, -1.0, 0.5], np.float32)}  # differs from the file
    )
    before = classifier.shared_params()
    served = classifier.score("alice", TEXTS)

    with pytest.raises(InvalidInputError, match=message):
        classifier.load_shared(path)

    for name, value in before.items():
        np.testing.assert_array_equal(classifier.shared_params()[name], value)
    np.testing.assert_array_equal(classifier.score("alice", TEXTS), served)


@pytest.mark.parametrize(
    "metadata",
    [{"format": "mine"}, {"bundle_identity": "x"}, {"n": 3}, {4: "four"}],
    ids=["format", "bundle-identity", "non-str-value", "non-str-key"],
)
def test_save_shared_refuses_bad_metadata_and_writes_nothing(
    classifier: Personalizer, tmp_path: Path, metadata: dict[object, object]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidInputError, match="metadata"):
        classifier.save_shared(out / "f", metadata)  # type: ignore[arg-type]
    assert list(out.iterdir()) == []


def test_the_file_holds_no_user_parameters(classifier: Personalizer, tmp_path: Path) -> None:
    classifier.add_examples("alice", topic_examples(6))
    classifier.train("alice")
    classifier.save_shared(tmp_path / "f")
    with safetensors.safe_open(str(tmp_path / "f"), framework="numpy") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("user.") for n in names)
    assert set(names) == set(classifier.shared_params())
